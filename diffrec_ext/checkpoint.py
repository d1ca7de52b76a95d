"""Checkpoints: tensors in safetensors, everything else in JSON. Nothing is pickled and nothing is
read back with torch.load, so a checkpoint from anywhere can be opened safely.

A checkpoint is a directory:

    model.safetensors   the model's parameters
    config.json         {"format", "config" (TrainConfig fields), "num_items", "dataset", "metrics", ...}
    items.json          original item id of every dense id 1..num_items (index 0 = dense id 1)
    state.safetensors   training state tensors: optimizer moments, sampler history, RNG states
    state.json          training state scalars: epoch, best metric, history of epoch records, ...

The two state files exist only in checkpoints written by the trainer. Every file is written to a
temporary file in the same directory, fsynced, and moved into place with os.replace. A training
run directory holds immutable epoch checkpoints (`epoch-0003/`, built in a temporary directory and
renamed into place when complete) and two pointer files, `last.json` and `best.json`, replaced
atomically, so a crash at any moment leaves a consistent run that `resume` can continue.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "diffrec-ext-checkpoint-v1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.json"
STATE_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
LAST_POINTER = "last.json"
BEST_POINTER = "best.json"


class CheckpointError(RuntimeError):
    pass


# --------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage_bytes(path: Path, data: bytes) -> str:
    """Writes `data` to a fsynced temporary file beside `path` and returns its name (removed again
    if the write fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    tmp = _stage_bytes(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_files(files: dict) -> None:
    """Writes several files: every temporary file is written and fsynced first, then all are renamed
    into place, so a failure while writing (the whole of the I/O) leaves every previous file as it
    was. Only a crash between the renames (microseconds) can mix old and new files."""
    staged = []
    try:
        for path, data in files.items():
            staged.append((_stage_bytes(Path(path), data), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for parent in {path.parent for _, path in staged}:
        _fsync_dir(parent)


def remove_stale_temporaries(directory) -> None:
    """Removes the temporary files (`.NAME.*.tmp`) and epoch directories (`.epoch-*`) a killed
    writer left in `directory`. Only for directories with a single writer, such as a run directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.name.startswith(".") and child.name.endswith(".tmp") and child.is_file():
            child.unlink(missing_ok=True)
        elif child.name.startswith(".epoch-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    return st_save(tensors, metadata=metadata)


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def atomic_write_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, _tensor_bytes(tensors, metadata))


def read_json(path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def read_tensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {error}") from None


# --------------------------------------------------------------------------- model part
def save_model(directory, model: torch.nn.Module, config: dict, item_ids, extra: dict | None = None) -> Path:
    """Write model.safetensors, config.json and items.json into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    item_ids = [_jsonable_id(i) for i in item_ids]
    meta = {"format": FORMAT, "config": config, "num_items": len(item_ids)}
    meta.update(extra or {})
    # all three files are written before any is renamed: overwriting a checkpoint either completes
    # or leaves the previous one whole
    atomic_write_files({
        directory / MODEL_FILE: _tensor_bytes(dict(model.state_dict()), metadata={"format": FORMAT}),
        directory / ITEMS_FILE: _json_bytes(item_ids),
        directory / CONFIG_FILE: _json_bytes(meta),
    })
    return directory


def _jsonable_id(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return str(value)


def resolve(path, which: str = "best") -> Path:
    """A checkpoint directory from a checkpoint directory or a training run directory (through
    its `best.json` or `last.json` pointer)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    pointer = path / (BEST_POINTER if which == "best" else LAST_POINTER)
    if pointer.is_file():
        content = read_json(pointer)
        name = content.get("checkpoint") if isinstance(content, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise CheckpointError(f"{pointer} must hold {{\"checkpoint\": \"<epoch directory>\"}}, got {content!r}")
        target = path / name
        if not (target / CONFIG_FILE).is_file():
            raise CheckpointError(f"{pointer} points to {target}, which is not a complete checkpoint")
        return target
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    raise CheckpointError(
        f"{path} is neither a checkpoint directory ({MODEL_FILE} + {CONFIG_FILE}) nor a run directory "
        f"with {pointer.name}"
    )


def read_meta(path, which: str = "best") -> tuple[Path, dict, list]:
    directory = resolve(path, which)
    meta = read_json(directory / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / CONFIG_FILE}: unknown checkpoint format {meta.get('format')!r}")
    items = read_json(directory / ITEMS_FILE)
    if not isinstance(items, list) or len(items) != meta.get("num_items"):
        raise CheckpointError(f"{directory / ITEMS_FILE} must list {meta.get('num_items')} item ids")
    return directory, meta, items


def load_model(path, device="cpu", which: str = "best"):
    """(model in eval mode, TrainConfig, item_ids, meta) from a checkpoint or run directory."""
    from .train import TrainConfig, build_model  # the config lives with the trainer

    directory, meta, items = read_meta(path, which)
    num_items = meta.get("num_items")
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise CheckpointError(f"{directory / CONFIG_FILE}: num_items must be a positive int, got {num_items!r}")
    try:
        config = TrainConfig.from_dict(meta.get("config"))
    except (ValueError, TypeError) as error:  # ConfigError is a ValueError
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config: {error}") from None
    model = build_model(config, num_items)
    load_weights(model, directory / MODEL_FILE)
    model.to(device).eval()
    return model, config, items, meta


def load_weights(model: torch.nn.Module, path) -> None:
    state = read_tensors(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name in expected:  # in the model's order, so the first mismatch reported is always the same
        tensor = state[name]
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, the model expects "
                                  f"{expected[name].dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf values")
    model.load_state_dict(state)


# --------------------------------------------------------------------------- training state
def optimizer_to_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, entries in state["state"].items():
        for name, value in entries.items():
            key = f"{param_id}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{key}"] = value
            else:
                scalars[key] = value
    groups = json.loads(json.dumps(state["param_groups"]))  # tuples -> lists
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_parts(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        param_id, key = name[len("optimizer."):].split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def write_run_checkpoint(run_dir, epoch: int, model, config: dict, item_ids, extra: dict,
                         state_tensors: dict[str, torch.Tensor], state: dict, is_best: bool) -> Path:
    """Write the complete checkpoint of `epoch` as run_dir/epoch-XXXX, then move the pointers
    (last always, best when `is_best`), then delete epoch directories no pointer refers to."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final = run_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
    try:
        save_model(tmp, model, config, item_ids, extra)
        atomic_write_tensors(tmp / STATE_TENSORS_FILE, state_tensors, metadata={"format": FORMAT})
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():  # left over from a run that crashed after writing it: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(run_dir)
    if is_best:
        atomic_write_json(run_dir / BEST_POINTER, {"checkpoint": name, "epoch": epoch})
    atomic_write_json(run_dir / LAST_POINTER, {"checkpoint": name, "epoch": epoch})
    keep = {read_json(run_dir / p)["checkpoint"] for p in (LAST_POINTER, BEST_POINTER) if (run_dir / p).is_file()}
    for child in run_dir.iterdir():
        if child.is_dir() and child.name.startswith("epoch-") and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
    remove_stale_temporaries(run_dir)  # left by a writer that was killed
    return final


def read_run_state(run_dir) -> tuple[Path, dict, dict[str, torch.Tensor]] | None:
    """(checkpoint dir, state scalars, state tensors) of the last completed epoch, or None when the
    run directory has no checkpoint yet."""
    run_dir = Path(run_dir)
    if not (run_dir / LAST_POINTER).is_file():
        return None
    directory = resolve(run_dir, "last")
    return directory, read_json(directory / STATE_FILE), read_tensors(directory / STATE_TENSORS_FILE)
