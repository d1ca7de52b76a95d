"""Every error the package raises on purpose, in one place at the bottom of the layers, so that any
module can raise one and a caller can catch them all from `diffrec_ext.errors` without importing
the module that raises it (the lower layers then never import an upper one for an exception)."""

from pathlib import Path


class ConfigError(ValueError):
    """A training or model setting that is missing, of the wrong type or out of range."""


class DataFormatError(ValueError):
    """A file that cannot be read as interactions. The message names the file and, where the
    problem sits on one line, its 1-based line number."""

    def __init__(self, path, problem: str, line: int | None = None):
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path, self.problem, self.line = Path(path), problem, line


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that is missing, damaged or does not fit the data."""


class UnknownItemsError(ValueError):
    """A history holds item ids the model's catalog does not know."""

    def __init__(self, row: int, unknown: list, name: str | None = None):
        self.row = row
        self.unknown = unknown
        shown = ", ".join(repr(item) for item in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        super().__init__(f"{name or f'history {row}'}: {len(unknown)} unknown item id(s): {shown}")


class ItemsLeftError(ValueError):
    """k above the items a history leaves to rank once its own items are excluded."""

    def __init__(self, k: int, left: int, row: int, name: str | None = None):
        self.k, self.left, self.row = k, left, row
        super().__init__(f"{name or f'history {row}'}: k = {k} exceeds the {left} items left after excluding "
                         "its own items")


class ShardingError(ValueError):
    """Bad input of a sharded call, raised on every rank of the group (whichever rank saw it)."""


class ScoringError(ValueError):
    """Options, inputs or an output directory that cannot be used (the message says why)."""


class DownloadError(RuntimeError):
    """A download that failed, did not match its checksum, or held an unsafe archive."""
