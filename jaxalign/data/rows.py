"""The raw dataset row, with the place it came from for error messages."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    """One dataset row as read from disk.

    ``line`` is the 1-based line number for ``.jsonl`` files and the 0-based row index for
    every other format. ``error`` is set (and ``data`` empty) for a row that could not be
    parsed, so the validator can report it or count it under ``--ignore_bad_rows``.
    """

    data: dict[str, Any]
    source: str
    line: int
    is_jsonl: bool = False
    error: str | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        """``"file.jsonl line 7"`` or ``"file.parquet row 3"``."""
        unit = "line" if self.is_jsonl else "row"
        return f"{self.source} {unit} {self.line}"


class LazySequence(Sequence):
    """A sequence whose items are made when read (rows parsed, validated or encoded on demand): subclasses define
    ``__len__`` and ``item(i)``; a slice gives a list."""

    @abstractmethod
    def item(self, i: int) -> Any:
        """Make item ``i`` (0 <= i < len)."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.item(j) for j in range(*i.indices(len(self)))]
        return self.item(i)


class RenamedRows(LazySequence):
    """``rows`` with their columns renamed by ``columns`` (source name -> the name jaxalign reads, ms-swift's
    ``--columns``), each row when it is read."""

    def __init__(self, rows: Sequence[Row], columns: dict[str, str]):
        self._rows, self._columns = rows, columns

    def __len__(self) -> int:
        return len(self._rows)

    def item(self, i: int) -> Row:
        row = self._rows[i]
        if row.error is not None:
            return row
        data = {self._columns.get(k, k): v for k, v in row.data.items()}
        return Row(data, row.source, row.line, row.is_jsonl, row.error)
