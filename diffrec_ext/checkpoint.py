"""Checkpoints: tensors in safetensors, everything else in JSON. Nothing is pickled and nothing is
read back with torch.load, so a checkpoint from anywhere can be opened safely.

A checkpoint is a directory:

    model.safetensors   the model's parameters; its metadata records the architecture it was saved with
    config.json         {"format", "config" (TrainConfig fields), "num_items", "sha256", "dataset", ...}
    items.json          original item id of every dense id 1..num_items (index 0 = dense id 1), unique
    state.safetensors   training state tensors: optimizer moments, sampler history, RNG states
    state.json          training state scalars: epoch, best metric, history of epoch records, "sha256", ...

Integrity: the JSON file written with each tensor file records its sha256 (config.json for
model.safetensors, state.json for state.safetensors), and model.safetensors records the
architecture fields of the config (every field but the training and inference settings in
EDITABLE_FIELDS, plus num_items). Loading refuses a tensor file whose bytes changed and a config.json
whose architecture differs from the one the weights were saved with, naming the file. These are
checks against accidents (bit flips, hand edits), not signatures. Checkpoints saved before these
records existed still load, with a warning saying how to add them.

The two state files exist only in checkpoints written by the trainer. Every file is written to a
temporary file in the same directory, fsynced, and moved into place with os.replace. A training
run directory holds immutable epoch checkpoints (`epoch-0003/`, built in a temporary directory and
renamed into place when complete) and two pointer files, `last.json` and `best.json`, replaced
atomically, so a crash at any moment leaves a consistent run that `resume` can continue.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import TrainConfig
from .errors import CheckpointError
from .model import build_model, resolve_step_embedding

FORMAT = "diffrec-ext-checkpoint-v1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.json"
STATE_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
LAST_POINTER = "last.json"
BEST_POINTER = "best.json"


# TrainConfig fields that are training or inference settings: editing them in config.json does not
# change what the weights compute. Every other field, and num_items, is architecture.
EDITABLE_FIELDS = ("dropout", "attn_dropout", "mse_weight", "importance_sampling", "importance_loss", "num_samples",
                   "inference", "eval_exclude_seen", "eval_batch_size", "lr", "lr_schedule", "weight_decay",
                   "batch_size", "epochs", "mode", "window_stride", "samples_per_epoch", "patience", "grad_clip",
                   "seed", "device", "bf16")
RECORDED_BY = {MODEL_FILE: CONFIG_FILE, STATE_TENSORS_FILE: STATE_FILE}  # tensor file -> JSON with its sha256


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


def read_json(path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_tensor_file(path: Path) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
    """(raw bytes, tensors, header metadata) of a safetensors file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    try:
        tensors = st_load(data)
        (header_size,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {error}") from None
    return data, tensors, metadata


def _check_sha256(path: Path, data: bytes) -> bool:
    """Compares the file's sha256 with the one recorded beside it (RECORDED_BY); False when none is."""
    record = path.parent / RECORDED_BY.get(path.name, CONFIG_FILE)
    content = read_json(record) if record.is_file() else None
    recorded = content.get("sha256") if isinstance(content, dict) else None
    expected = recorded.get(path.name) if isinstance(recorded, dict) else None
    if expected is None:
        return False
    actual = _sha256(data)
    if actual != expected:
        raise CheckpointError(f"{path}: its sha256 {actual[:16]}... differs from the {str(expected)[:16]}... "
                              f"recorded in {record.name} when it was saved: the file was modified or corrupted")
    return True


def read_tensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, checked against its recorded sha256."""
    path = Path(path)
    data, tensors, _ = _read_tensor_file(path)
    _check_sha256(path, data)
    return tensors


# --------------------------------------------------------------------------- model part
def save_model(directory, model: torch.nn.Module, config: dict, item_ids, extra: dict | None = None) -> Path:
    """Write model.safetensors, config.json and items.json into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    item_ids = [_jsonable_id(i) for i in item_ids]
    architecture = json.dumps(architecture_of(config, len(item_ids)), sort_keys=True)
    weights = _tensor_bytes(dict(model.state_dict()), metadata={"format": FORMAT, "architecture": architecture})
    meta = {"format": FORMAT, "config": config, "num_items": len(item_ids), "sha256": {MODEL_FILE: _sha256(weights)}}
    meta.update(extra or {})
    # all three files are written before any is renamed: overwriting a checkpoint either completes
    # or leaves the previous one whole
    atomic_write_files({
        directory / MODEL_FILE: weights,
        directory / ITEMS_FILE: _json_bytes(item_ids),
        directory / CONFIG_FILE: _json_bytes(meta),
    })
    return directory


def architecture_of(config: dict, num_items) -> dict:
    """The fields of a config (as saved in config.json) that decide what the weights compute; the
    step embedding resolved, since "auto" depends on the (editable) training mode."""
    config = TrainConfig.with_current_names(config)
    architecture = {name: value for name, value in config.items() if name not in EDITABLE_FIELDS}
    if "step_embedding" in config:
        architecture["step_embedding"] = resolve_step_embedding(config["step_embedding"], config.get("mode", ""))
    return {**architecture, "num_items": num_items}


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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory / CONFIG_FILE} must hold a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / CONFIG_FILE}: unknown checkpoint format {meta.get('format')!r}")
    items = read_json(directory / ITEMS_FILE)
    if not isinstance(items, list) or len(items) != meta.get("num_items"):
        raise CheckpointError(f"{directory / ITEMS_FILE} must list {meta.get('num_items')} item ids")
    _check_item_ids(directory / ITEMS_FILE, items)
    return directory, meta, items


def _check_item_ids(path: Path, items: list) -> None:
    """Item ids are unique ints or strings (1 and "1" count as the same id: Recommender accepts both)."""
    first_of: dict[str, int] = {}
    for index, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise CheckpointError(f"{path}: entry {index} = {json.dumps(item)} is not an item id (an int or a string)")
        first = first_of.setdefault(str(item), index)
        if first != index:
            raise CheckpointError(f"{path}: entry {index} = {json.dumps(item)} repeats entry {first} = "
                                  f"{json.dumps(items[first])}: item ids must be unique")


def load_model(path, device="cpu", which: str = "best"):
    """(model in eval mode, TrainConfig, item_ids, meta) from a checkpoint or run directory."""
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
    """Loads a checkpoint's model.safetensors into `model`, after checking its tensors against the
    model, its recorded architecture against the config.json beside it, and its sha256."""
    path = Path(path)
    data, state, metadata = _read_tensor_file(path)
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
    recorded_architecture = _check_architecture(path, metadata.get("architecture"))
    if not (_check_sha256(path, data) and recorded_architecture):
        warnings.warn(f"{path.parent} has no integrity records (saved before diffrec-ext recorded them): its "
                      f"config and tensors are checked against each other's shapes only. To add them, load it "
                      f"and save it again: diffrec_ext.checkpoint.resave(path)", stacklevel=3)
    model.load_state_dict(state)


def _check_architecture(path: Path, recorded_json: str | None) -> bool:
    """Compares the architecture model.safetensors was saved with to the config.json beside it;
    False when the file records none."""
    if recorded_json is None:
        return False
    meta = read_json(path.parent / CONFIG_FILE)
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path.parent / CONFIG_FILE}: no model config to check {path.name} against")
    recorded = json.loads(recorded_json)
    current = architecture_of(config, meta.get("num_items"))
    for name in sorted(set(recorded) | set(current)):
        if recorded.get(name) != current.get(name):
            raise CheckpointError(
                f"{path.parent / CONFIG_FILE}: {name} = {json.dumps(current.get(name))}, but {path.name} was saved "
                f"with {name} = {json.dumps(recorded.get(name))}: the config no longer describes these weights")
    return True


def resave(path, which: str = "best") -> Path:
    """Rewrites a checkpoint in place with its integrity records (for checkpoints saved before
    they existed; its config must still describe its weights). Returns the checkpoint directory."""
    directory, meta, items = read_meta(path, which)
    model = build_model(TrainConfig.from_dict(meta["config"]), meta["num_items"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_weights(model, directory / MODEL_FILE)
    extra = {key: value for key, value in meta.items() if key not in ("format", "config", "num_items", "sha256")}
    return save_model(directory, model, meta["config"], items, extra)


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
        state_bytes = _tensor_bytes(state_tensors, metadata={"format": FORMAT})
        atomic_write_bytes(tmp / STATE_TENSORS_FILE, state_bytes)
        atomic_write_json(tmp / STATE_FILE, {**state, "sha256": {STATE_TENSORS_FILE: _sha256(state_bytes)}})
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
