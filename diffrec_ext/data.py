"""Interaction data for sequential recommendation: readers, the paper's preprocessing, leave-one-out
splits and model batches.

The one path through this module:

    table = read_interactions(path)                # DataFrame: user, item, timestamp[, rating]
    dataset = preprocess(table, name="ml-1m")      # SequenceDataset: k-core, chronological, dense ids
    train = training_sequences(dataset)            # TrainingSequences: (history, target) rows
    valid = evaluation_batch(dataset, "valid")     # EvaluationBatch: histories, targets, seen items
    for batch in iterate_batches(train, 256, shuffle=True, generator=0):
        ...                                        # dict of torch.LongTensor

`load_dataset(path)` does the first two steps in one call.

Conventions:
- The interaction table's row order is the file order; it breaks timestamp ties.
- Dense item ids run 1..num_items; 0 is padding. Dense user ids run 0..num_users-1. Both follow the
  sorted order of the original ids.
- Leave-one-out: a user's last item is the test target, the second to last the validation target, the
  rest is the training part. Every user therefore needs at least 3 interactions.
- Histories are left-padded with 0 to `max_len` and keep the most recent `max_len` items.
"""

from __future__ import annotations

import csv
import io
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import DataFormatError

__all__ = [
    "DataFormatError",
    "FORMATS",
    "detect_format",
    "read_interactions",
    "read_sequence_file",
    "read_movielens",
    "read_recbole_inter",
    "read_csv_interactions",
    "read_parquet_interactions",
    "preprocess",
    "load_dataset",
    "DatasetStats",
    "SequenceDataset",
    "TRAIN_MODES",
    "TrainingSequences",
    "training_target_count",
    "EvaluationBatch",
    "training_sequences",
    "evaluation_batch",
    "iterate_batches",
    "item_popularity",
    "popularity_ranking_metrics",
]

FORMATS = ("sequence", "movielens", "recbole", "csv", "parquet")
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"  # a byte-order mark some editors write at the start of UTF-8 files
PARQUET_MAGIC = b"PAR1"
MIN_SEQUENCE_LENGTH = 3  # leave-one-out needs a training item, a validation target and a test target


# --------------------------------------------------------------------------------------------------
# Reading bytes


def _gunzip(path: Path, data: bytes) -> bytes:
    """Decompresses every gzip member; a truncated stream is reported with the line it ends in."""
    parts = []
    while data:
        stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            parts.append(stream.decompress(data))
        except zlib.error as error:
            raise DataFormatError(path, f"is not valid gzip data ({error})") from error
        if not stream.eof:
            line = b"".join(parts).count(b"\n") + 1
            raise DataFormatError(path, "gzip stream is truncated: the data ends inside this line", line)
        data = stream.unused_data
    return b"".join(parts)


def _load_text_bytes(path: Path) -> bytes:
    """The file's decompressed bytes, ending in exactly one newline (trailing blank lines are not
    data, so they are dropped here; blank lines elsewhere are errors)."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC or path.suffix == ".gz":
        raw = _gunzip(path, raw)
    raw = raw.removeprefix(UTF8_BOM)
    end = len(raw)
    while end and raw[end - 1] in b"\r\n":
        end -= 1
    if end == 0 or raw.isspace():
        raise DataFormatError(path, "file is empty")
    if end == len(raw) - 1 and raw.endswith(b"\n"):
        return raw  # already ends in exactly one newline: no copy
    return raw[:end] + b"\n"


def _decode_line(path: Path, line: bytes, number: int) -> str:
    try:
        return line.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(path, f"is not valid UTF-8 ({error})", number) from error


def _offset_after_lines(raw: bytes, count: int) -> int:
    offset = 0
    for _ in range(count):
        offset = raw.index(b"\n", offset) + 1
    return offset


def _first_line(raw: bytes) -> bytes:
    return raw[: raw.index(b"\n")].rstrip(b"\r")


# --------------------------------------------------------------------------------------------------
# Line validation, shared by the fast path's fallback scan

_INTEGER = re.compile(r"[+-]?\d+")
_OTHER_DELIMITERS = ("::", "\t", ",", ";", "|", " ")
_FIELD_LABELS = {"user": "user id", "item": "item id", "rating": "rating", "timestamp": "timestamp"}


@dataclass(frozen=True)
class _Column:
    name: str  # "user", "item", "rating", "timestamp", or "" for a column that is ignored
    kind: str  # "int", "float", "token" (a non-empty string) or "any"

    @property
    def label(self) -> str:
        return _FIELD_LABELS.get(self.name, self.name or "extra field")


def _value_problem(value: str, column: _Column) -> str | None:
    if column.kind == "int" and not _INTEGER.fullmatch(value):
        return f"non-numeric {column.label} {value!r}" if value else f"empty {column.label}"
    if column.kind == "int" and abs(int(value)) >= 2**63:
        return f"{column.label} {value} does not fit in 64 bits"
    if column.kind == "float":
        try:
            number = float(value)
        except ValueError:
            return f"non-numeric {column.label} {value!r}" if value else f"empty {column.label}"
        if not math.isfinite(number):
            return f"{column.label} {value!r} is not a finite number"
    if column.kind == "token" and not value:
        return f"empty {column.label}"
    return None


def _line_problem(text: str, sep: str, columns: tuple[_Column, ...]) -> str | None:
    if not text.strip():
        return "blank line"
    fields = text.split(sep)
    expected = len(columns)
    if len(fields) != expected:
        layout = f"{sep!r}-separated fields ({', '.join(c.label for c in columns)})"
        for other in _OTHER_DELIMITERS:
            if other not in sep and sep not in other and len(text.split(other)) == expected:
                return f"wrong delimiter: found {other!r} where {expected} {layout} were expected"
        if len(fields) < expected:
            return f"truncated line: {len(fields)} of {expected} {layout}"
        return f"wrong number of fields: {len(fields)} instead of {expected} {layout}"
    for value, column in zip(fields, columns):
        problem = _value_problem(value, column)
        if problem:
            return problem
    return None


def _raise_first_bad_line(path, raw: bytes, sep: str, columns, header_lines: int, cause) -> None:
    """Slow line-by-line scan, run only after the fast parse failed, to name the first bad line."""
    for number, line in enumerate(io.BytesIO(raw), start=1):
        if number > header_lines:
            problem = _line_problem(_decode_line(path, line, number), sep, columns)
            if problem:
                raise DataFormatError(path, problem, number)
    raise DataFormatError(path, f"could not be parsed ({cause})")


def _parse_delimited(path: Path, raw: bytes, sep: str, columns: tuple[_Column, ...], header_lines: int):
    """Reads an unquoted delimited file with pandas' C parser and checks that every line has exactly
    the expected fields with values of the expected kind; on any doubt the first bad line is found."""
    body = _offset_after_lines(raw, header_lines)
    num_rows = raw.count(b"\n", body)
    if num_rows == 0:
        raise DataFormatError(path, "has a header but no interactions")
    parse_sep, parse_columns = sep, columns
    if sep == "::":  # the C parser wants one character: read ':' with an empty column between fields
        parse_sep = ":"
        parse_columns = tuple(c for column in columns for c in (column, _Column("", "any")))[:-1]
    dtypes = {"int": "int64", "float": "float64", "token": str, "any": str}
    try:
        frame = pd.read_csv(
            io.BytesIO(raw), sep=parse_sep, header=None, skiprows=header_lines, engine="c",
            dtype={i: dtypes[c.kind] for i, c in enumerate(parse_columns)}, quoting=csv.QUOTE_NONE,
            keep_default_na=False, na_values=[""], skip_blank_lines=False,
        )
    except (ValueError, OverflowError, pd.errors.ParserError) as error:
        _raise_first_bad_line(path, raw, sep, columns, header_lines, error)
    # pandas rejects a line with too many fields but silently pads one with too few; when no line is
    # over, the separator total is right only if every line has exactly the expected count.
    fields_ok = frame.shape == (num_rows, len(parse_columns)) and raw.count(
        parse_sep.encode(), body) == (len(parse_columns) - 1) * num_rows
    if sep == "::":  # six ':' per line, paired as three '::' only in the `a::b::c::d` layout
        fields_ok = fields_ok and raw.count(b"::", body) == (len(columns) - 1) * num_rows
    checked = [i for i, c in enumerate(parse_columns) if c.kind != "any"]
    values_ok = fields_ok and not frame.iloc[:, checked].isna().any().any()
    floats = [i for i, c in enumerate(parse_columns) if c.kind == "float"]
    values_ok = values_ok and bool(np.isfinite(frame.iloc[:, floats].to_numpy(np.float64)).all())
    if not values_ok:
        _raise_first_bad_line(path, raw, sep, columns, header_lines, "inconsistent fields")
    named = {i: c.name for i, c in enumerate(parse_columns) if c.name}
    return frame[list(named)].set_axis(list(named.values()), axis=1)


def _interaction_table(path: Path, fmt: str, user, item, timestamp, rating=None) -> pd.DataFrame:
    columns = {"user": user, "item": item, "timestamp": timestamp}
    if rating is not None:
        columns["rating"] = np.asarray(rating, dtype=np.float64)
    table = pd.DataFrame(columns)
    table.attrs["source"] = f"{path} ({fmt})"
    return table


def _positions_within_user(users) -> np.ndarray:
    return pd.Series(users).groupby(users, sort=False).cumcount().to_numpy(np.int64)


# --------------------------------------------------------------------------------------------------
# Readers


def read_sequence_file(path) -> pd.DataFrame:
    """Reads per-user sequence lines `user item item ...` (space separated, oldest first, optionally
    gzipped). The timestamp column is the item's position in its line (0-based)."""
    path = Path(path)
    raw = _load_text_bytes(path)
    if any(byte in raw for byte in (b"\t", b"\x0b", b"\x0c", b"\x00")) or raw.count(b"\r") != raw.count(b"\r\n"):
        _raise_first_bad_sequence_line(path, raw)
    try:
        values = np.array(raw.split()).astype(np.int64)
    except (ValueError, OverflowError):
        _raise_first_bad_sequence_line(path, raw)
    # Which line each token is on, from the byte positions of token starts and newlines.
    buffer = np.frombuffer(raw, dtype=np.uint8)
    is_separator = (buffer == ord(" ")) | (buffer == ord("\n")) | (buffer == ord("\r"))
    token_starts = np.flatnonzero(~is_separator & np.concatenate(([True], is_separator[:-1])))
    newlines = np.flatnonzero(buffer == ord("\n"))
    tokens_per_line = np.bincount(np.searchsorted(newlines, token_starts), minlength=len(newlines))
    first_token = np.concatenate(([0], np.cumsum(tokens_per_line)[:-1]))
    users = values[first_token]
    if tokens_per_line.min() < 2 or len(np.unique(users)) != len(users):
        _raise_first_bad_sequence_line(path, raw)
    is_item = np.ones(len(values), dtype=bool)
    is_item[first_token] = False
    line_of_item = np.repeat(np.arange(len(users)), tokens_per_line - 1)
    position = np.arange(len(line_of_item)) - np.repeat(first_token - np.arange(len(users)), tokens_per_line - 1)
    return _interaction_table(path, "sequence", users[line_of_item], values[is_item], position)


def _raise_first_bad_sequence_line(path: Path, raw: bytes) -> None:
    first_line_of_user: dict[int, int] = {}
    for number, line in enumerate(io.BytesIO(raw), start=1):
        text = _decode_line(path, line, number)
        if "\r" in text:
            raise DataFormatError(path, "carriage return (\\r) inside the line: lines must end in \\n or \\r\\n "
                                        "(old Mac line endings?)", number)
        if any(char in text for char in "\t\x0b\x0c"):
            raise DataFormatError(path, "wrong delimiter: found a tab; fields must be separated by spaces", number)
        fields = text.split()
        if not fields:
            raise DataFormatError(path, "blank line", number)
        for position, value in enumerate(fields):
            if not _INTEGER.fullmatch(value):
                if any(char in value for char in ",;:|"):
                    raise DataFormatError(path, f"wrong delimiter in {value!r}: fields must be separated "
                                                "by spaces", number)
                what = "user" if position == 0 else "item"
                raise DataFormatError(path, f"non-numeric {what} id {value!r}", number)
            if abs(int(value)) >= 2**63:
                raise DataFormatError(path, f"id {value} does not fit in 64 bits", number)
        if len(fields) == 1:
            raise DataFormatError(path, f"truncated line: user {fields[0]} has no items "
                                        "(expected 'user item [item ...]')", number)
        user = int(fields[0])
        if user in first_line_of_user:
            raise DataFormatError(path, f"user {user} already has a sequence on line "
                                        f"{first_line_of_user[user]}", number)
        first_line_of_user[user] = number
    raise AssertionError(f"{path}: the fast parse failed but every line is valid")


_MOVIELENS_COLUMNS = (_Column("user", "int"), _Column("item", "int"), _Column("rating", "float"),
                      _Column("timestamp", "int"))
_MOVIELENS_CSV_HEADER = "userId,movieId,rating,timestamp"


def read_movielens(path) -> pd.DataFrame:
    """Reads MovieLens ratings: `ratings.dat` of ML-1M/10M (`UserID::MovieID::Rating::Timestamp`),
    `u.data` of ML-100k (tab separated) or `ratings.csv` of ML-20M/25M (with its header); optionally
    gzipped. Columns: user, item, timestamp, rating."""
    path = Path(path)
    raw = _load_text_bytes(path)
    first = _first_line(raw).decode("utf-8", errors="replace")
    if first.strip() == _MOVIELENS_CSV_HEADER:
        sep, header_lines = ",", 1
    elif "::" in first:
        sep, header_lines = "::", 0
    elif "\t" in first:
        sep, header_lines = "\t", 0
    else:
        raise DataFormatError(path, f"not a MovieLens ratings line: {first[:80]!r} (expected "
                                    f"'UserID::MovieID::Rating::Timestamp', tab-separated u.data, or a "
                                    f"ratings.csv with header {_MOVIELENS_CSV_HEADER!r})", 1)
    frame = _parse_delimited(path, raw, sep, _MOVIELENS_COLUMNS, header_lines)
    return _interaction_table(path, "movielens", frame["user"].to_numpy(), frame["item"].to_numpy(),
                              frame["timestamp"].to_numpy(), frame["rating"].to_numpy())


_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


def read_recbole_inter(path, *, user_field: str = "user_id", item_field: str = "item_id",
                       time_field: str = "timestamp", rating_field: str = "rating") -> pd.DataFrame:
    """Reads a RecBole atomic `.inter` file: tab separated, with a typed header such as
    `user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float`, columns in any order and
    other columns ignored. Ids stay strings (RecBole tokens). Without a timestamp column the
    timestamp is the position among the user's lines."""
    path = Path(path)
    raw = _load_text_bytes(path)
    header = _decode_line(path, _first_line(raw), 1).split("\t")
    roles = {user_field: ("user", "token"), item_field: ("item", "token"),
             time_field: ("timestamp", "float"), rating_field: ("rating", "float")}
    columns, seen = [], set()
    for spec in header:
        name, _, kind = spec.rpartition(":")
        if not name or kind not in _RECBOLE_TYPES:
            raise DataFormatError(path, f"header field {spec!r} is not 'name:type' with type in "
                                        f"{_RECBOLE_TYPES}", 1)
        if name in seen:
            raise DataFormatError(path, f"header field {name!r} appears twice", 1)
        seen.add(name)
        role, want = roles.get(name, ("", kind))
        if role and kind != want:
            raise DataFormatError(path, f"header field {spec!r} should have type {want!r}", 1)
        columns.append(_Column(role, want if role else "any"))
    for required in (user_field, item_field):
        if required not in seen:
            raise DataFormatError(path, f"header has no {required!r} field (fields: {header})", 1)
    frame = _parse_delimited(path, raw, "\t", tuple(columns), header_lines=1)
    users = frame["user"].to_numpy(dtype=object)
    timestamp = frame["timestamp"].to_numpy() if time_field in seen else _positions_within_user(users)
    rating = frame["rating"].to_numpy() if rating_field in seen else None
    return _interaction_table(path, "recbole", users, frame["item"].to_numpy(dtype=object), timestamp, rating)


def _numeric_values(column: pd.Series, allow_dates: bool) -> np.ndarray:
    """The column as numbers, NaN where a value is missing or not a number; with allow_dates, a column
    of ISO dates becomes microseconds since 1970 (exact in float64)."""
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy()
    numbers = pd.to_numeric(column, errors="coerce")
    if allow_dates and numbers.isna().all():
        dates = pd.to_datetime(column, errors="coerce", format="ISO8601", utc=True)
        return ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)).to_numpy(np.float64)
    return numbers.to_numpy(np.float64)


_ID_KINDS = ("integer", "string", "floating", "mixed-integer-float", "empty")  # pandas.api.types.infer_dtype


def _is_id(value) -> bool:
    return isinstance(value, (str, int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _shown(value) -> str:
    return f"{str(value)!r}" if pd.api.types.is_scalar(value) else _typed(value)


def _typed(value) -> str:
    return f"{type(value).__name__} {str(value)!r:.40}"


def _id_column_problem(column: pd.Series) -> tuple[int, str] | None:
    """(row, problem) when an id column is not all integers or all strings (lists, structs, bytes,
    booleans, dates, or a mix); None when it is."""
    values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    kind = pd.api.types.infer_dtype(values, skipna=True)
    if kind in _ID_KINDS:
        return None
    present = [(row, value) for row, value in enumerate(column) if not (pd.api.types.is_scalar(value) and pd.isna(value))]
    row, value = next(((row, value) for row, value in present if not _is_id(value)), (None, None))
    if row is None:  # scalar ids of different types: the first that differs from the first id
        first = isinstance(present[0][1], str)
        row, value = next((row, value) for row, value in present if isinstance(value, str) != first)
    return row, f"holds {_typed(value)} ({kind} values): ids must be all integers or all strings"


def _table_from_columns(path: Path, fmt: str, frame: pd.DataFrame, user_col, item_col, time_col,
                        rating_col, line_of_row) -> pd.DataFrame:
    """Checks the named columns of a CSV/Parquet frame; `line_of_row(i)` is the file line of row i,
    or None where the file has no lines (Parquet)."""
    needed = [c for c in (user_col, item_col, time_col, rating_col) if c is not None]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataFormatError(path, f"no column {missing} (columns: {list(frame.columns)})",
                              1 if fmt == "csv" else None)
    if len(frame) == 0:
        raise DataFormatError(path, "has a header but no interactions")
    def fail(name: str, row: int, problem: str):
        line = line_of_row(row) if line_of_row else None
        raise DataFormatError(path, f"{'' if line else f'row {row + 1}: '}column {name!r} {problem}", line)

    values = {}
    for name in needed:
        column = frame[name]
        if pd.api.types.is_bool_dtype(column):
            raise DataFormatError(path, f"column {name!r} is boolean (dtype {column.dtype}); expected "
                                        f"{'ids' if name in (user_col, item_col) else 'numbers'}")
        if name in (time_col, rating_col):
            values[name] = _numeric_values(column, allow_dates=name == time_col)
            bad = ~np.isfinite(values[name].astype(np.float64))
        else:
            values[name] = column.to_numpy()
            bad = column.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = column.iloc[row]
            expected = "a number or ISO date" if name == time_col else "a number"
            fail(name, row, "is missing" if pd.api.types.is_scalar(value) and pd.isna(value)
                 else f"is not {expected}: {_shown(value)}")
        if name in (user_col, item_col):
            problem = _id_column_problem(column)
            if problem:
                fail(name, *problem)
    users = values[user_col]
    timestamp = values[time_col] if time_col is not None else _positions_within_user(users)
    rating = values[rating_col] if rating_col is not None else None
    return _interaction_table(path, fmt, users, values[item_col], timestamp, rating)


def _first_bad_csv_line(path: Path, raw: bytes, sep: str, header: list[str]) -> DataFormatError | None:
    lines = csv.reader(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", newline=""), delimiter=sep)
    next(lines)
    for fields in lines:
        if len(fields) != len(header):
            problem = "blank line" if not fields else (
                f"wrong number of fields: {len(fields)} instead of {len(header)} ({', '.join(header)})")
            return DataFormatError(path, problem, lines.line_num)
    return None


def read_csv_interactions(path, *, user_col: str = "user", item_col: str = "item",
                          time_col: str | None = "timestamp", rating_col: str | None = None,
                          sep: str = ",") -> pd.DataFrame:
    """Reads a CSV (optionally gzipped) with a header row; the named columns become user, item,
    timestamp (numbers or ISO dates; None = file order within each user) and rating. Other columns
    are ignored."""
    path = Path(path)
    raw = _load_text_bytes(path)
    header = next(csv.reader([_decode_line(path, _first_line(raw), 1)], delimiter=sep))

    try:
        frame = pd.read_csv(io.BytesIO(raw), sep=sep, skip_blank_lines=False, keep_default_na=False,
                            na_values=[""], index_col=False)
    except (ValueError, pd.errors.ParserError) as error:
        raise _first_bad_csv_line(path, raw, sep, header) or DataFormatError(path, f"could not be parsed ({error})")
    # pandas pads short lines and (with index_col=False) cuts long ones silently, so count the fields:
    # by separators when nothing is quoted, else with the csv module.
    num_lines = raw.count(b"\n")
    if b'"' in raw or raw.count(sep.encode()) != (len(header) - 1) * num_lines or len(frame) != num_lines - 1:
        error = _first_bad_csv_line(path, raw, sep, header)
        if error:
            raise error
    # Without quoted newlines, data row i is on line i + 2 (the header is line 1).
    return _table_from_columns(path, "csv", frame, user_col, item_col, time_col, rating_col,
                               lambda row: row + 2)


def read_parquet_interactions(path, *, user_col: str = "user", item_col: str = "item",
                              time_col: str | None = "timestamp", rating_col: str | None = None) -> pd.DataFrame:
    """Reads a Parquet file with pandas (needs pyarrow or fastparquet); same columns as
    `read_csv_interactions`."""
    path = Path(path)
    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise ImportError(f"reading {path} needs a Parquet engine: pip install pyarrow "
                          f"(or pip install 'diffrec-ext[parquet]')") from None
    return _table_from_columns(path, "parquet", frame, user_col, item_col, time_col, rating_col,
                               None)


_READERS = {"sequence": read_sequence_file, "movielens": read_movielens, "recbole": read_recbole_inter,
            "csv": read_csv_interactions, "parquet": read_parquet_interactions}


def detect_format(path) -> str:
    """Guesses the format from the file name, then from the first line."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(UTF8_BOM)
    if head[:4] == PARQUET_MAGIC or name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".inter"):
        return "recbole"
    if head[:2] == GZIP_MAGIC:
        try:
            head = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(head).removeprefix(UTF8_BOM)
        except zlib.error:
            return "sequence"  # the reader reports the broken gzip stream
    first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
    if name in ("ratings.dat", "u.data") or "::" in first or first == _MOVIELENS_CSV_HEADER:
        return "movielens"
    header = first.split("\t")
    if all(":" in field for field in header) and any(f.endswith((":token", ":float")) for f in header):
        return "recbole"
    if name.endswith(".csv"):
        return "csv"
    if len(header) == 4 and all(_INTEGER.fullmatch(f) for f in header[:2]):
        return "movielens"  # u.data: user, item, rating, timestamp separated by tabs
    return "sequence"


def read_interactions(path, fmt: str = "auto", **options) -> pd.DataFrame:
    """Reads any supported file into the interaction table (columns user, item, timestamp and, when
    the file has ratings, rating; rows in file order). `fmt` is "auto" or one of FORMATS; `options`
    go to the format's reader (column names for csv/parquet/recbole)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    return _READERS[fmt](path, **options)


# --------------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class DatasetStats:
    num_users: int
    num_items: int
    num_actions: int
    avg_length: float
    min_length: int
    median_length: float
    max_length: int
    density: float  # num_actions / (num_users * num_items)


@dataclass(frozen=True, eq=False)
class SequenceDataset:
    """Chronological per-user sequences of dense item ids.

    User u's sequence, oldest first, is `items[offsets[u]:offsets[u + 1]]`. `user_original_ids[u]` is
    the id the file used for user u; `item_original_ids[i]` the file's id of dense item i, with
    index 0 (padding) holding a placeholder (-1 for integer ids, "" otherwise). `notes` records how
    the data was read and filtered.
    """

    name: str
    items: np.ndarray  # int64 [num_actions], values in 1..num_items
    offsets: np.ndarray  # int64 [num_users + 1]
    user_original_ids: np.ndarray  # [num_users]
    item_original_ids: np.ndarray  # [num_items + 1]
    notes: tuple[str, ...] = ()
    stats: DatasetStats = field(init=False)

    def __post_init__(self):
        items, offsets = self.items, self.offsets
        if not all(isinstance(a, np.ndarray) and a.dtype == np.int64 for a in (items, offsets)):
            raise TypeError("items and offsets must be int64 numpy arrays")
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(items):
            raise ValueError("offsets must run from 0 to len(items) with at least one user")
        lengths = np.diff(offsets)
        if lengths.min() < MIN_SEQUENCE_LENGTH:
            raise ValueError(f"{int((lengths < MIN_SEQUENCE_LENGTH).sum())} users have fewer than "
                             f"{MIN_SEQUENCE_LENGTH} items; leave-one-out needs train, valid and test items")
        if len(self.user_original_ids) != len(lengths):
            raise ValueError(f"{len(self.user_original_ids)} user ids for {len(lengths)} sequences")
        num_items = len(self.item_original_ids) - 1
        if items.min() < 1 or items.max() > num_items:
            raise ValueError(f"item ids must lie in 1..{num_items} (0 is padding)")
        stats = DatasetStats(
            num_users=len(lengths), num_items=num_items, num_actions=len(items),
            avg_length=float(lengths.mean()), min_length=int(lengths.min()),
            median_length=float(np.median(lengths)), max_length=int(lengths.max()),
            density=len(items) / (len(lengths) * num_items),
        )
        object.__setattr__(self, "stats", stats)

    @property
    def num_users(self) -> int:
        return self.stats.num_users

    @property
    def num_items(self) -> int:
        """Catalog size without padding: dense ids run 1..num_items."""
        return self.stats.num_items

    @property
    def num_actions(self) -> int:
        return self.stats.num_actions

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    @cached_property
    def _item_lookup(self) -> pd.Index:
        return pd.Index(self.item_original_ids[1:])

    @cached_property
    def _user_lookup(self) -> pd.Index:
        return pd.Index(self.user_original_ids)

    def dense_items(self, original_ids) -> np.ndarray:
        """Dense ids (1..num_items) of original item ids; KeyError for ids not in the dataset."""
        return _lookup(self._item_lookup, original_ids, "item") + 1

    def dense_users(self, original_ids) -> np.ndarray:
        """Dense user indices (0..num_users-1) of original user ids."""
        return _lookup(self._user_lookup, original_ids, "user")

    def original_items(self, dense_ids) -> np.ndarray:
        dense_ids = np.asarray(dense_ids)
        if dense_ids.size and (dense_ids.min() < 1 or dense_ids.max() > self.num_items):
            raise KeyError(f"dense item ids must lie in 1..{self.num_items}")
        return self.item_original_ids[dense_ids]

    def interactions(self) -> pd.DataFrame:
        """The dataset back as a table of dense ids; timestamp = position in the user's sequence."""
        users = np.repeat(np.arange(self.num_users), self.lengths)
        return pd.DataFrame({"user": users, "item": self.items,
                             "timestamp": np.arange(self.num_actions) - self.offsets[users]})

    def describe(self) -> str:
        s = self.stats
        lines = [
            f"{self.name}: {s.num_users:,} users, {s.num_items:,} items, {s.num_actions:,} actions",
            f"  sequence length: avg {s.avg_length:.2f}, min {s.min_length}, median {s.median_length:g}, "
            f"max {s.max_length}; density {100 * s.density:.3f}%",
        ]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def _lookup(index: pd.Index, keys, what: str) -> np.ndarray:
    keys = np.asarray(keys)
    positions = index.get_indexer(keys.ravel())
    if (positions < 0).any():
        raise KeyError(f"unknown {what} ids: {keys.ravel()[positions < 0][:10].tolist()}")
    return positions.reshape(keys.shape).astype(np.int64)


def _placeholder(values: np.ndarray):
    return -1 if np.issubdtype(values.dtype, np.number) else ""


def _k_core(users: np.ndarray, items: np.ndarray, user_k: int, item_k: int) -> tuple[np.ndarray, int]:
    """Keep-mask of the largest subset where every user has >= user_k and every item >= item_k
    interactions (repeated interactions count), reached by removing offenders until nothing changes.
    Returns the mask and the number of removal rounds."""
    keep = np.ones(len(users), dtype=bool)
    rounds = 0
    while True:
        user_counts = np.bincount(users[keep], minlength=users.max() + 1)
        item_counts = np.bincount(items[keep], minlength=items.max() + 1)
        offending = keep & ((user_counts[users] < user_k) | (item_counts[items] < item_k))
        if not offending.any():
            return keep, rounds
        keep &= ~offending
        rounds += 1


def preprocess(interactions: pd.DataFrame, name: str = "dataset", *, k_core: int = 5,
               item_k_core: int | None = None, min_rating: float | None = None) -> SequenceDataset:
    """The paper's preprocessing: every interaction is implicit feedback (optionally only those with
    rating >= min_rating), iterative k-core filtering, chronological order, dense re-indexing.

    k-core: users keep >= k_core interactions and items >= item_k_core (default: k_core), iterated to
    a fixed point; a threshold <= 1 removes nothing. Sequences are sorted by timestamp, ties kept in
    the table's row order (the file order). Users with fewer than 3 interactions after filtering
    cannot be split leave-one-out: they are an error (raise k_core to 3 to filter them out).
    """
    for column in ("user", "item", "timestamp"):
        if column not in interactions.columns:
            raise ValueError(f"the interaction table has no {column!r} column: {list(interactions.columns)}")
        if interactions[column].isna().any():
            raise ValueError(f"the interaction table has missing values in column {column!r}")
    if len(interactions) == 0:
        raise ValueError("the interaction table is empty")
    source = interactions.attrs.get("source")
    notes = [f"read {len(interactions):,} interactions from {source}"] if source else []
    row_order = np.arange(len(interactions))
    if min_rating is not None:
        if "rating" not in interactions.columns:
            raise ValueError("min_rating needs a 'rating' column, and this table has none")
        liked = interactions["rating"].to_numpy() >= min_rating
        notes.append(f"rating >= {min_rating:g}: kept {int(liked.sum()):,} of {len(liked):,} interactions")
        interactions, row_order = interactions[liked], row_order[liked]
        if len(interactions) == 0:
            raise ValueError(f"no interaction has rating >= {min_rating}")

    user_codes, user_ids = pd.factorize(interactions["user"], sort=True)
    item_codes, item_ids = pd.factorize(interactions["item"], sort=True)
    item_k = k_core if item_k_core is None else item_k_core
    keep, rounds = _k_core(user_codes, item_codes, k_core, item_k)
    removed = len(keep) - int(keep.sum())
    if k_core > 1 or item_k > 1:
        kept_users, kept_items = np.unique(user_codes[keep]), np.unique(item_codes[keep])
        notes.append(f"k-core (users >= {k_core}, items >= {item_k}): {rounds} removal rounds; removed "
                     f"{len(user_ids) - len(kept_users):,} users, {len(item_ids) - len(kept_items):,} "
                     f"items, {removed:,} interactions")
    if not keep.any():
        raise ValueError(f"the k-core filter (users >= {k_core}, items >= {item_k}) removed everything")

    user_codes, item_codes = user_codes[keep], item_codes[keep]
    timestamp, row_order = interactions["timestamp"].to_numpy()[keep], row_order[keep]
    # Dense ids keep the sorted order of the original ids: np.unique of the sorted codes.
    kept_users, dense_user = np.unique(user_codes, return_inverse=True)
    kept_items, dense_item = np.unique(item_codes, return_inverse=True)
    lengths = np.bincount(dense_user, minlength=len(kept_users))
    short = lengths < MIN_SEQUENCE_LENGTH
    if short.any():
        examples = user_ids.to_numpy()[kept_users[short]][:5].tolist()
        raise ValueError(f"{int(short.sum()):,} users have fewer than {MIN_SEQUENCE_LENGTH} interactions after "
                         f"filtering (e.g. {examples}), too few for a leave-one-out split; use k_core >= "
                         f"{MIN_SEQUENCE_LENGTH} to drop them")
    order = np.lexsort((row_order, timestamp, dense_user))  # last key is primary
    user_original_ids = user_ids.to_numpy()[kept_users]
    item_values = item_ids.to_numpy()[kept_items]
    item_original_ids = np.concatenate((np.array([_placeholder(item_values)], dtype=item_values.dtype),
                                        item_values))
    return SequenceDataset(
        name=name,
        items=(dense_item[order] + 1).astype(np.int64),
        offsets=np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
        user_original_ids=user_original_ids,
        item_original_ids=item_original_ids,
        notes=tuple(notes),
    )


def load_dataset(path, fmt: str = "auto", name: str | None = None, *, k_core: int = 5,
                 item_k_core: int | None = None, min_rating: float | None = None,
                 **reader_options) -> SequenceDataset:
    """read_interactions + preprocess. The name defaults to the file name without suffixes."""
    path = Path(path)
    table = read_interactions(path, fmt, **reader_options)
    name = name or path.name.split(".")[0]
    return preprocess(table, name, k_core=k_core, item_k_core=item_k_core, min_rating=min_rating)


# --------------------------------------------------------------------------------------------------
# Windows, splits and batches


def _windows(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """[R, max_len] int64: the last max_len items of items[starts[r]:ends[r]], left-padded with 0."""
    positions = ends[:, None] + np.arange(-max_len, 0)[None, :]
    return np.where(positions >= starts[:, None], items[np.maximum(positions, 0)], 0)


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[r], ends[r]) over r."""
    counts = ends - starts
    return np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())


TRAIN_MODES = ("window", "prefix", "user")


@dataclass(frozen=True, eq=False)
class TrainingSequences:
    """Training rows as spans of the dataset's item array, gathered into padded arrays on demand.

    "prefix" rows hold one target each: history items[starts[r]:ends[r]] (its most recent max_len
    items), target items[ends[r]].
    "window" and "user" rows are windows: the items items[max(starts[r], ends[r] - max_len):ends[r]],
    left-padded to max_len; every position holding an item at index >= supervised_from[r] is a
    target, predicted from the window's items before it (one pass supervises them all).
    """

    items: np.ndarray
    starts: np.ndarray  # int64 [M]: first position of the row's user in items
    ends: np.ndarray  # int64 [M]: prefix: position of the target; windows: end of the span (exclusive)
    users: np.ndarray  # int64 [M]
    max_len: int
    mode: str
    supervised_from: np.ndarray | None = None  # int64 [M], windows only

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def is_window(self) -> bool:
        return self.supervised_from is not None

    @property
    def num_targets(self) -> int:
        """Targets the rows supervise: one per prefix row, ends - supervised_from per window."""
        return int((self.ends - self.supervised_from).sum()) if self.is_window else len(self)

    @property
    def targets(self) -> np.ndarray:
        """Prefix rows: [M] targets; window rows: every supervised target, row by row."""
        if self.is_window:
            return self.items[_ranges(self.supervised_from, self.ends)]
        return self.items[self.ends]

    def histories(self, rows=None) -> np.ndarray:
        """[R, max_len] left-padded histories (prefix rows) or windows of the given rows."""
        rows = slice(None) if rows is None else rows
        return _windows(self.items, self.starts[rows], self.ends[rows], self.max_len)

    def supervised(self, rows=None) -> np.ndarray:
        """[R, max_len] bool: the window positions that are targets (window rows only)."""
        rows = slice(None) if rows is None else rows
        first = self.ends[rows, None] - self.max_len + np.arange(self.max_len)[None, :]  # item index per position
        return first >= self.supervised_from[rows, None]

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.is_window:
            batch = {"user": self.users[rows], "window": self.histories(rows), "supervised": self.supervised(rows)}
        else:
            batch = {"user": self.users[rows], "history": self.histories(rows), "target": self.items[self.ends[rows]]}
        return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}


def training_target_count(dataset: SequenceDataset) -> int:
    """Every training target: each item of a user's training part (all but the last two items)
    after the first."""
    return int(np.maximum(dataset.lengths - 3, 0).sum())


def _window_rows(starts: np.ndarray, lengths: np.ndarray, max_len: int, stride: int):
    """(user index, end, supervised_from) of the windows cutting each training part of `lengths`
    items (>= 2) that starts at `starts`: the first window is the first min(L, T) items and
    supervises positions 1.., then windows end stride items later (the last at L) and supervise
    the items after the previous window's end. So each target is supervised exactly once, with at
    least T - stride items of context where the part has them."""
    later = np.maximum(np.ceil((lengths - max_len) / stride), 0).astype(np.int64)
    per_user = later + 1
    owner = np.repeat(np.arange(len(lengths)), per_user)
    index = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)  # 0.. per user
    length = lengths[owner]
    end = np.minimum(max_len + index * stride, length)
    supervised_from = np.where(index == 0, 1, np.minimum(max_len + (index - 1) * stride, length))
    return owner, starts[owner] + end, starts[owner] + supervised_from


def training_sequences(dataset: SequenceDataset, max_len: int = 50, mode: str = "window",
                       stride: int | None = None) -> TrainingSequences:
    """Training rows from each user's training part (all but the last two items).

    "prefix" (the paper's construction): every prefix of length >= 2 of every training part:
    history = prefix[:-1] (max_len of it), target = prefix[-1].
    "window": each training part cut into windows of max_len items, `stride` apart (1 <= stride <
    max_len; default max_len // 2): every training target is supervised exactly once, with at least
    max_len - stride items of context where the user has them (see _window_rows).
    "user": one window per user, its last max_len training items, every position supervised.
    """
    _check_max_len(max_len)
    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    starts = dataset.offsets[:-1]
    train_lengths = dataset.lengths - 2
    if mode == "prefix":
        per_user = np.maximum(train_lengths - 1, 0)  # targets at train positions 1..L-1
        users = np.repeat(np.arange(dataset.num_users), per_user)
        ends = _ranges(starts + 1, starts + 1 + per_user)
        return TrainingSequences(dataset.items, starts[users], ends.astype(np.int64), users.astype(np.int64),
                                 int(max_len), mode)
    if max_len < 2:
        raise ValueError(f"windows need max_len >= 2 (an item and its target), got {max_len}")
    users = np.flatnonzero(train_lengths >= 2)
    if mode == "user":
        ends = starts[users] + train_lengths[users]
        supervised_from = np.maximum(starts[users] + 1, ends - max_len + 1)
    else:
        stride = max_len // 2 if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride < max_len:
            raise ValueError(f"stride must be an int in [1, max_len - 1 = {max_len - 1}], got {stride!r}")
        owner, ends, supervised_from = _window_rows(starts[users], train_lengths[users], max_len, int(stride))
        users = users[owner]
    return TrainingSequences(dataset.items, starts[users], ends.astype(np.int64), users.astype(np.int64),
                             int(max_len), mode, supervised_from.astype(np.int64))


@dataclass(frozen=True, eq=False)
class EvaluationBatch:
    """Leave-one-out evaluation rows, one per user: the left-padded history, the target, and every
    item of the (untruncated) history as a CSR list, for excluding seen items from the ranking.

    Note that with repeat consumption the target can be among the seen items; excluding them would
    then make the target unreachable.
    """

    split: str
    users: np.ndarray  # int64 [U]
    histories: np.ndarray  # int64 [U, max_len]
    targets: np.ndarray  # int64 [U]
    seen_offsets: np.ndarray  # int64 [U + 1]
    seen_items: np.ndarray  # int64 [nnz]

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        starts, ends = self.seen_offsets[rows], self.seen_offsets[rows + 1]
        batch = {
            "user": self.users[rows], "history": self.histories[rows], "target": self.targets[rows],
            "seen_offsets": np.concatenate(([0], np.cumsum(ends - starts))),
            "seen_items": self.seen_items[_ranges(starts, ends)],
        }
        return {key: torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64)) for key, value in batch.items()}


def evaluation_batch(dataset: SequenceDataset, split: str = "valid", max_len: int = 50) -> EvaluationBatch:
    """split "valid": history = training part, target = second-to-last item; "test": history =
    everything before the last item, target = the last item."""
    _check_max_len(max_len)
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    starts = dataset.offsets[:-1]
    ends = dataset.offsets[1:] - (2 if split == "valid" else 1)
    return EvaluationBatch(
        split=split,
        users=np.arange(dataset.num_users, dtype=np.int64),
        histories=_windows(dataset.items, starts, ends, max_len),
        targets=dataset.items[ends],
        seen_offsets=np.concatenate(([0], np.cumsum(ends - starts))).astype(np.int64),
        seen_items=dataset.items[_ranges(starts, ends)],
    )


def iterate_batches(source: TrainingSequences | EvaluationBatch, batch_size: int = 256, *,
                    shuffle: bool = False,
                    generator: torch.Generator | np.random.Generator | int | None = None,
                    device: torch.device | str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yields dicts of tensors for consecutive rows of `source` (the last batch may be smaller).

    Keys: "user"; "history" [B, max_len] and "target" [B] for prefix-mode training rows and for
    evaluation rows, which add "seen_offsets" [B + 1] and "seen_items" (CSR); "window" [B, max_len]
    and "supervised" [B, max_len] (bool: the positions that are targets) for window- and user-mode
    training rows. Ids are int64. With shuffle, the order is a permutation drawn from `generator`:
    a torch or numpy Generator (which advances, so successive epochs differ reproducibly), an int
    seed, or None for torch's global one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(generator, (int, np.integer)):
        generator = torch.Generator().manual_seed(int(generator))
    num_rows = len(source)
    if not shuffle:
        order = np.arange(num_rows)
    elif isinstance(generator, np.random.Generator):
        order = generator.permutation(num_rows)
    else:
        order = torch.randperm(num_rows, generator=generator).numpy()
    for first in range(0, num_rows, batch_size):
        batch = source.batch(order[first:first + batch_size])
        if device is not None:
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        yield batch


# --------------------------------------------------------------------------------------------------
# The popularity baseline, the floor every model must clear


def item_popularity(dataset: SequenceDataset, split: str = "test") -> np.ndarray:
    """[num_items + 1] interaction counts of each dense item in the data visible at `split`:
    the training parts for "valid", everything but the test targets for "test". Index 0 is 0."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    # Distance of each action from the end of its sequence: 1 = test target, 2 = validation target.
    user_of_action = np.repeat(np.arange(dataset.num_users), dataset.lengths)
    from_end = dataset.offsets[user_of_action + 1] - np.arange(dataset.num_actions)
    visible = from_end > (2 if split == "valid" else 1)
    return np.bincount(dataset.items[visible], minlength=dataset.num_items + 1)


def popularity_ranking_metrics(dataset: SequenceDataset, split: str = "test", ks=(5, 10, 20),
                               exclude_seen: bool = False) -> dict[str, float]:
    """HR@K and NDCG@K of ranking the full catalog by `item_popularity` (the same for every user),
    averaged over users. A tie counts against the target (rank = 1 + number of other items with a
    count >= the target's), the pessimistic convention of the ranking ops. With exclude_seen, the
    user's history items other than the target leave the ranking."""
    counts = item_popularity(dataset, split)[1:]
    evaluation = evaluation_batch(dataset, split, max_len=1)
    target_counts = counts[evaluation.targets - 1]
    # Items (target included) with a count >= the target's.
    ranks = len(counts) - np.searchsorted(np.sort(counts), target_counts, side="left")
    if exclude_seen:
        lengths = np.diff(evaluation.seen_offsets)
        rows = np.repeat(evaluation.users, lengths)
        pair = np.unique(rows * (dataset.num_items + 1) + evaluation.seen_items)  # each seen item once
        rows, seen = pair // (dataset.num_items + 1), pair % (dataset.num_items + 1)
        outranks = (counts[seen - 1] >= target_counts[rows]) & (seen != evaluation.targets[rows])
        ranks = ranks - np.bincount(rows[outranks], minlength=len(ranks))
    metrics = {}
    for k in ks:
        hit = ranks <= k
        metrics[f"HR@{k}"] = float(hit.mean())
        metrics[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    return metrics
