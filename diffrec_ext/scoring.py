"""Batch scoring (`diffrec score`): the top-k items of every user of a dataset, or of every history
of a file, streamed through the inference engine and written as Parquet or CSV part files.

Output: a directory (`--out recs.parquet`) of part files `part-000000.parquet`, ... with the rows
(user, rank, item, score) in the data's own ids, rank 1 .. k best first, and `_manifest.json`.
`pandas.read_parquet(dir)` and `pyarrow.dataset` read the directory as one table (they skip names
starting with `_` or `.`).

- Chunks: input row r belongs to chunk r // chunk_users; chunk c is one engine call whose noise
  is seeded with `inference.batch_seed(seed, c)`, and becomes part file c. So every row depends
  only on the input, the options and the chunk size: not on interruptions, nor on how many
  processes ran.
- Resumable: a part is written to a temporary file and renamed (it exists whole or not at all);
  a rerun with the same options skips the chunks whose part exists. The manifest records the
  options and fingerprints of the input and the checkpoint: a rerun that differs is refused.
- Sharded: under torchrun, process r of P scores chunks r, r + P, r + 2P, ...; rank 0 writes the
  manifest once every part exists.
- Memory: one chunk at a time (its histories, outputs and encoded part); history files are read
  as a stream (a dataset given with --data is held whole, as every command holds it).

History files (--histories): JSON lines `{"user": ..., "history": [item, ...]}`, Parquet with a
user column and a list column, or CSV with a header and the history as space-separated item ids
(`.gz` for JSON lines and CSV); items oldest first, in the checkpoint's own ids. A file's user ids
must be all integers or all strings (its first row decides); a bad row stops the run with the
file and the line (or row) named.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._deprecation import NUM_SAMPLES_RENAME, renamed_keywords
from .checkpoint import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from .distributed import rank_and_world_size
from .errors import DataFormatError, ItemsLeftError, ScoringError, UnknownItemsError
from .inference import batch_seed, check_room

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = "diffrec-scores/1"
OUTPUT_FORMATS = ("parquet", "csv")
HISTORY_FORMATS = ("jsonl", "csv", "parquet")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
INTEGER = re.compile(r"[+-]?\d+")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet  # noqa: F401 (the submodules are used as pyarrow.csv, pyarrow.parquet)
    except ImportError:
        raise ScoringError("diffrec score writes with pyarrow, which is not installed: "
                           "pip install 'diffrec-ext[parquet]' (or pip install pyarrow)") from None
    return pyarrow


def id_array(values):
    """Original ids as an Arrow array: int64 when every id is an integer, else strings (a mix of
    integers and strings is written as strings)."""
    pa = _pyarrow()
    values = list(values)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        return pa.array(values, type=pa.int64())
    return pa.array([str(v) for v in values], type=pa.string())


def file_fingerprint(path) -> dict:
    """Size and sha256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------- inputs
@dataclass
class Chunk:
    """One chunk of input rows, decoded: original user ids, dense histories (oldest first) and
    where each row sits in the input (for error messages)."""

    users: object  # pyarrow array
    histories: list
    where: list[str]


class DatasetUsers:
    """Every user of a loaded dataset (data.SequenceDataset), in dataset order; each user's whole
    sequence is the history (as `diffrec recommend --user`). Its dense item ids are the model's
    when the catalogs match (the caller checks)."""

    def __init__(self, dataset, fingerprint: dict):
        self.dataset = dataset
        self.num_rows = dataset.num_users
        self.fingerprint = fingerprint
        self.users = id_array(dataset.user_original_ids)

    def blocks(self, size: int) -> Iterator[tuple[int, int, tuple[int, int]]]:
        """(chunk index, rows, raw block) of every chunk."""
        for index, start in enumerate(range(0, self.num_rows, size)):
            stop = min(self.num_rows, start + size)
            yield index, stop - start, (start, stop)

    def decode(self, block, engine) -> Chunk:
        start, stop = block
        users = self.users[start:stop]
        where = [f"user {user}" for user in users.to_pylist()]
        return Chunk(users, [self.dataset.sequence(u) for u in range(start, stop)], where)


class HistoryFile:
    """Histories read from a file as a stream (formats: see the module docstring)."""

    def __init__(self, path, fmt: str = "auto", user_field: str = "user", history_field: str = "history"):
        self.path = Path(path)
        if not self.path.is_file():
            raise ScoringError(f"histories file {self.path} " + ("is not a file" if self.path.exists()
                                                                 else "does not exist"))
        self.format = self.detect_format(self.path) if fmt == "auto" else fmt
        if self.format not in HISTORY_FORMATS:
            raise ScoringError(f"histories format must be one of {HISTORY_FORMATS}, got {fmt!r}")
        self.user_field, self.history_field = user_field, history_field
        self.fingerprint = {**file_fingerprint(self.path), "format": self.format, "user_field": user_field,
                            "history_field": history_field}
        self.num_rows: int | None = None  # known up front for Parquet only
        if self.format == "parquet":
            self.user_is_int = self._parquet_user_is_int()
        else:
            first = next(self._text_rows(), None)
            if first is None:
                raise DataFormatError(self.path, "no histories in the file")
            self.user_is_int = None
            self.user_is_int = self._user_kind(*first)

    @staticmethod
    def detect_format(path: Path) -> str:
        fmt = SUFFIX_FORMATS.get(Path(path.name.lower().removesuffix(".gz")).suffix)
        if fmt is None:
            raise ScoringError(f"cannot tell the format of {path} from its name: pass --histories-format "
                               f"({', '.join(HISTORY_FORMATS)})")
        return fmt

    def blocks(self, size: int) -> Iterator[tuple[int, int, object]]:
        """(chunk index, rows, raw block) of every chunk; every row is read, only the chunks that
        are scored are decoded."""
        if self.format == "parquet":
            for index, table in enumerate(self._parquet_tables(size)):
                yield index, table.num_rows, table
            return
        rows = self._text_rows()
        for index in itertools.count():
            block = list(itertools.islice(rows, size))
            if not block:
                return
            yield index, len(block), block

    # --- JSON lines and CSV
    def _open_text(self):
        raw = gzip.open(self.path, "rb") if self.path.name.endswith(".gz") else open(self.path, "rb")
        return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")

    def _text_rows(self) -> Iterator[tuple[int, object]]:
        """(line number, raw row) of every data row: a JSON line, or a CSV row's (user, history)."""
        with self._open_text() as handle:
            if self.format == "jsonl":
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield number, line
                return
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return
            names = [name.strip() for name in header]
            missing = [name for name in (self.user_field, self.history_field) if name not in names]
            if missing:
                raise DataFormatError(self.path, f"the header has no column {missing[0]!r} (columns: {names}); "
                                                 "name them with --user-field / --history-field", line=1)
            user_column, history_column = names.index(self.user_field), names.index(self.history_field)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(names):
                    raise DataFormatError(self.path, f"{len(row)} fields where the header has {len(names)}",
                                          line=reader.line_num)
                yield reader.line_num, (row[user_column], row[history_column])

    def _parse_text_row(self, number: int, raw) -> tuple[object, list]:
        if self.format == "csv":
            user_text, history_text = raw
            user = user_text.strip()
            if self.user_is_int is not False and INTEGER.fullmatch(user):
                user = int(user)
            return user, history_text.split()
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DataFormatError(self.path, f"malformed JSON: {error.msg} at column {error.colno}", line=number) from None
        if not isinstance(record, dict):
            raise DataFormatError(self.path, f'expected a JSON object {{"{self.user_field}": ..., '
                                             f'"{self.history_field}": [item, ...]}}, got {type(record).__name__}',
                                  line=number)
        for name in (self.user_field, self.history_field):
            if name not in record:
                raise DataFormatError(self.path, f"no field {name!r} (fields: {sorted(record)})", line=number)
        history = record[self.history_field]
        if not isinstance(history, list):
            raise DataFormatError(self.path, f"{self.history_field!r} must be a list of item ids, got "
                                             f"{json.dumps(history)[:40]}", line=number)
        return record[self.user_field], history

    def _user_kind(self, number: int, raw) -> bool:
        user, _ = self._parse_text_row(number, raw)
        return self._check_user(user, f"line {number}")

    def _check_user(self, user, where: str) -> bool:
        """True for an integer id, False for a string; an error for anything else or for a kind
        other than the file's first user's."""
        is_int = isinstance(user, int) and not isinstance(user, bool)
        if not is_int and not isinstance(user, str):
            raise DataFormatError(self.path, f"{where}: the user id must be an integer or a string, got "
                                             f"{json.dumps(user)[:40]}")
        if self.user_is_int is not None and is_int != self.user_is_int:
            kinds = ("a string", "an integer") if self.user_is_int else ("an integer", "a string")
            raise DataFormatError(self.path, f"{where}: user {user!r} is {kinds[0]} but the file's first user is "
                                             f"{kinds[1]}: a file's user ids must be all integers or all strings")
        return is_int

    # --- Parquet
    def _parquet_user_is_int(self) -> bool:
        pa = _pyarrow()
        try:
            parquet = pa.parquet.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as error:
            raise DataFormatError(self.path, f"not a readable Parquet file: {error}") from None
        schema = parquet.schema_arrow
        missing = [name for name in (self.user_field, self.history_field) if name not in schema.names]
        if missing:
            raise DataFormatError(self.path, f"no column {missing[0]!r} (columns: {schema.names}); name them "
                                             "with --user-field / --history-field")
        self.num_rows = parquet.metadata.num_rows
        if self.num_rows == 0:
            raise DataFormatError(self.path, "no histories in the file")
        user_type, history_type = schema.field(self.user_field).type, schema.field(self.history_field).type
        is_text = (pa.types.is_string, pa.types.is_large_string)
        if not (pa.types.is_list(history_type) or pa.types.is_large_list(history_type)) or not (
                pa.types.is_integer(history_type.value_type) or any(f(history_type.value_type) for f in is_text)):
            raise DataFormatError(self.path, f"column {self.history_field!r} must hold lists of item ids "
                                             f"(integers or strings), got {history_type}")
        if pa.types.is_integer(user_type):
            return True
        if any(f(user_type) for f in is_text):
            return False
        raise DataFormatError(self.path, f"column {self.user_field!r} must hold integers or strings, got {user_type}")

    def _parquet_tables(self, size: int):
        """Tables of exactly `size` rows (the last one may be shorter), read batch by batch."""
        pa = _pyarrow()
        pending, count, first_row = [], 0, 0
        batches = pa.parquet.ParquetFile(self.path).iter_batches(batch_size=size,
                                                                 columns=[self.user_field, self.history_field])
        for batch in batches:
            pending.append(batch)
            count += batch.num_rows
            while count >= size:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, size).replace_schema_metadata({"first_row": str(first_row)})
                first_row += size
                rest = table.slice(size)
                pending, count = rest.to_batches(), rest.num_rows
        if count:
            yield pa.Table.from_batches(pending).replace_schema_metadata({"first_row": str(first_row)})

    # --- decoding a chunk
    def decode(self, block, engine) -> Chunk:
        pa = _pyarrow()
        if self.format == "parquet":
            first_row = int(block.schema.metadata[b"first_row"])
            where = [f"row {first_row + i + 1}" for i in range(block.num_rows)]
            users = block.column(self.user_field).to_pylist()
            histories = block.column(self.history_field).to_pylist()
            for user, history, place in zip(users, histories, where):
                if user is None:
                    raise DataFormatError(self.path, f"{place}: the user id is missing (null)")
                if history is None or any(item is None for item in history):
                    raise DataFormatError(self.path, f"{place}: the history (or one of its items) is null")
        else:
            users, histories, where = [], [], []
            for number, raw in block:
                user, history = self._parse_text_row(number, raw)
                self._check_user(user, f"line {number}")
                users.append(user)
                histories.append(history)
                where.append(f"line {number}")
        for history, place in zip(histories, where):
            if not history:
                raise DataFormatError(self.path, f"{place}: the history is empty")
            bad = next((item for item in history if isinstance(item, bool) or not isinstance(item, (int, str))), None)
            if bad is not None:
                raise DataFormatError(self.path, f"{place}: item {json.dumps(bad)[:40]} is not an item id "
                                                 "(an integer or a string)")
        try:
            dense = engine.to_dense(histories)
        except UnknownItemsError as error:
            shown = ", ".join(map(repr, error.unknown[:10])) + (", ..." if len(error.unknown) > 10 else "")
            raise DataFormatError(self.path, f"{where[error.row]}: {len(error.unknown)} item id(s) the model does "
                                             f"not know: {shown}") from None
        user_type = pa.int64() if self.user_is_int else pa.string()
        return Chunk(pa.array(users, type=user_type), dense, [f"{self.path}, {place}" for place in where])


# ------------------------------------------------------------------------------------- output
class PartWriter:
    """Part files of one output directory: `part-{chunk:06d}.{format}`, each written whole."""

    def __init__(self, directory: Path, fmt: str, item_ids):
        self.directory, self.format = directory, fmt
        self.items = id_array(item_ids) if item_ids is not None else None  # None: the model's dense ids

    def path(self, index: int) -> Path:
        return self.directory / f"part-{index:06d}.{self.format}"

    def write(self, index: int, users, ids: torch.Tensor, scores: torch.Tensor) -> int:
        """Writes the rows (user, rank, item, score) of one chunk; returns their count."""
        pa = _pyarrow()
        count, k = ids.shape
        flat = ids.reshape(-1).numpy()
        items = self.items.take(pa.array(flat - 1)) if self.items is not None else pa.array(flat)
        table = pa.table({
            "user": users.take(pa.array(np.repeat(np.arange(count), k))),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), count)),
            "item": items,
            "score": pa.array(scores.reshape(-1).numpy()),
        })
        sink = pa.BufferOutputStream()
        if self.format == "parquet":
            pa.parquet.write_table(table, sink)
        else:
            pa.csv.write_csv(table, sink)
        atomic_write_bytes(self.path(index), sink.getvalue())
        return table.num_rows


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ScoringError(f"cannot read {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ScoringError(f"{path} is not a manifest of diffrec score ({MANIFEST_FORMAT})")
    return manifest


def prepare_output(directory: Path, options: dict, sources: dict) -> dict | None:
    """Checks `directory` for a run with the same options (else an error), removes what a killed
    writer left and records the options; returns the manifest of a run that is already complete."""
    manifest_path = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise ScoringError(f"--out {directory} exists and is not a directory")
    if manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
        before = manifest.get("options", {})
        differ = sorted(key for key in options.keys() | before.keys() if options.get(key) != before.get(key))
        if differ:
            changes = "; ".join(f"{key}: {before.get(key)!r} then, {options.get(key)!r} now" for key in differ)
            raise ScoringError(f"{directory} holds scores made with other options ({changes}): pass another --out, "
                               "or remove that directory to start over")
        if manifest.get("complete"):
            return manifest
    elif directory.is_dir() and any(directory.iterdir()):
        raise ScoringError(f"--out {directory} is not empty and holds no {MANIFEST}: pass a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    atomic_write_json(manifest_path, {"format": MANIFEST_FORMAT, "complete": False, "options": options,
                                      "sources": sources})
    return None


# ------------------------------------------------------------------------------------- scoring
@dataclass
class ScoreReport:
    out: Path
    users: int  # input rows, each one user
    scored: int  # users scored by this run (every process)
    resumed: int  # users whose part existed already
    rows: int
    parts: int
    seconds: float
    processes: int = 1
    already_complete: bool = False

    @property
    def users_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else float("nan")


def _collective(device):
    """(broadcast from rank 0, sum over ranks) of this process's group, or identities without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (lambda value: value), (lambda values: values)

    def broadcast(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def total(values):
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    return broadcast, total




@renamed_keywords(**NUM_SAMPLES_RENAME)
def score(engine, source, out, *, k: int = 10, exclude_seen: bool = True, num_samples: int | None = None,
          algorithm: str | None = None, stride: int = 1, seed: int = 0, chunk_users: int = 8192,
          output_format: str = "parquet", identity: dict | None = None, sources: dict | None = None,
          progress: bool = True) -> ScoreReport:
    """Top-k of every row of `source` (DatasetUsers or HistoryFile) into the directory `out` (see
    the module docstring). Under torch.distributed every process calls it with the same arguments.

    identity: further facts a resumed run must share (e.g. the checkpoint's fingerprint);
    sources: where the input and checkpoint live (recorded, not compared)."""
    _pyarrow()  # fail before any work when it is missing
    _check_score_arguments(engine, k, chunk_users, output_format)
    num_samples, algorithm = engine.check_options(num_samples, algorithm, stride)
    out = Path(out)
    options = json.loads(json.dumps({
        "k": k, "exclude_seen": bool(exclude_seen), "num_samples": num_samples, "algorithm": algorithm,
        "stride": stride,
        "seed": seed, "chunk_users": chunk_users, "format": output_format, "input": source.fingerprint,
        **(identity or {})}))
    rank, world = rank_and_world_size()
    broadcast, total = _collective(engine.device)
    state = None
    if rank == 0:
        try:
            state = ("ok", prepare_output(out, options, sources or {}))
        except (ScoringError, OSError) as error:
            state = ("error", str(error))
    state = broadcast(state)
    if state[0] == "error":
        raise ScoringError(state[1] if rank == 0 else f"rank 0 could not prepare the output: {state[1]}")
    if state[1] is not None:  # complete already
        done = state[1]
        return ScoreReport(out, done["users"], 0, done["users"], done["rows"], len(done["parts"]), 0.0,
                           world, already_complete=True)

    writer = PartWriter(out, output_format, engine.item_ids)
    pending = None
    if source.num_rows is not None:
        pending = sum(min(chunk_users, source.num_rows - start)
                      for index, start in enumerate(range(0, source.num_rows, chunk_users))
                      if index % world == rank and not writer.path(index).is_file())
    from tqdm.auto import tqdm

    bar = tqdm(total=pending, desc="scoring", unit="user", disable=True if not progress or rank != 0 else None)
    started = time.perf_counter()
    rows_in = scored = resumed = 0
    chunks = 0
    try:
        for index, count, block in source.blocks(chunk_users):
            rows_in += count
            chunks = index + 1
            if index % world != rank:
                continue
            if writer.path(index).is_file():
                resumed += count
                continue
            chunk = source.decode(block, engine)
            if exclude_seen:
                try:
                    check_room(k, engine.num_items, chunk.histories, chunk.where)
                except ItemsLeftError as error:
                    raise ScoringError(f"{error}; lower -k or pass --no-exclude-seen") from None
            ids, scores = engine.recommend_dense(chunk.histories, k=k, exclude_seen=exclude_seen,
                                                 num_samples=num_samples, algorithm=algorithm, stride=stride,
                                                 seed=batch_seed(seed, index))
            writer.write(index, chunk.users, ids, scores)
            scored += count
            bar.update(count)
    finally:
        bar.close()
    scored, resumed = total([scored, resumed])
    seconds = time.perf_counter() - started
    report = ScoreReport(out, rows_in, scored, resumed, rows_in * k, chunks, seconds, world)
    if rank == 0:
        _write_manifest(report, writer, options, sources or {}, chunk_users)
    return report


def _check_score_arguments(engine, k, chunk_users, output_format) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= engine.num_items:
        raise ScoringError(f"k must be an int in [1, {engine.num_items}] (the catalog), got {k!r}")
    if not isinstance(chunk_users, int) or isinstance(chunk_users, bool) or chunk_users < 1:
        raise ScoringError(f"chunk_users must be a positive int, got {chunk_users!r}")
    if output_format not in OUTPUT_FORMATS:
        raise ScoringError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")


def _write_manifest(report: ScoreReport, writer: PartWriter, options: dict, sources: dict, chunk_users: int) -> None:
    """The manifest that marks `report.out` complete, after checking that every part file is there."""
    out, users, chunks = report.out, report.users, report.parts
    missing = [index for index in range(chunks) if not writer.path(index).is_file()]
    if missing:
        raise ScoringError(f"{len(missing)} part file(s) missing after the run (first: "
                           f"{writer.path(missing[0]).name}): was another process writing into {out}?")
    atomic_write_json(out / MANIFEST, {
        "format": MANIFEST_FORMAT, "complete": True, "options": options, "sources": sources,
        "columns": {"user": "original user id", "rank": "1 = best", "item": "original item id",
                    "score": "seed-averaged probability"},
        "users": users, "rows": report.rows,
        "parts": [{"file": writer.path(index).name, "users": min(chunk_users, users - index * chunk_users)}
                  for index in range(chunks)],
        "last_run": {"processes": report.processes, "scored": report.scored, "resumed": report.resumed,
                     "seconds": round(report.seconds, 3),
                     "users_per_second": round(report.users_per_second, 1) if report.scored else None},
    })
