"""Read dataset files named with ms-swift's `--dataset` syntax into :class:`Row` lists.

``spec`` is a comma-separated list of paths, each a ``.jsonl``, ``.json``, ``.csv`` or
``.parquet`` file or a folder written by ``datasets.Dataset.save_to_disk``, optionally
followed by ``#N`` to take a seeded random sample of N rows (more than the file holds repeats
it, as ms-swift does).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxalign.data.rows import LazySequence, Row
from jaxalign.errors import ConfigError, DataError

SUPPORTED = ".jsonl, .json, .csv, .parquet or a folder saved by datasets.save_to_disk"


def parse_spec(spec: str) -> list[tuple[str, int | None]]:
    """Split ``"a.jsonl#500,b.parquet"`` into ``[("a.jsonl", 500), ("b.parquet", None)]``."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ConfigError("--dataset is empty; pass a path such as data.jsonl (comma-separate several)")
    out: list[tuple[str, int | None]] = []
    for part in parts:
        path, n = part, None
        if "#" in part:
            path, _, count = part.rpartition("#")
            try:
                n = int(count)
            except ValueError:
                raise ConfigError(
                    f"--dataset {part!r}: the part after '#' must be a row count such as {path}#500"
                ) from None
            if n <= 0:
                raise ConfigError(f"--dataset {part!r}: the sample size after '#' must be positive")
        out.append((path, n))
    return out


def load_dataset_rows(spec: str, *, seed: int = 42, ignore_bad_rows: bool = False) -> list[Row]:
    """Load every file of ``spec`` (ms-swift ``--dataset`` syntax) as :class:`Row` objects.

    A line of a ``.jsonl`` file that is not a JSON object raises :class:`DataError` naming the
    file and line, unless ``ignore_bad_rows`` is set: then it is kept as a row with ``error``
    set, for :func:`jaxalign.data.formats.normalize_rows` to count and skip.
    ``#N`` samples use ``seed`` (ms-swift's ``--data_seed``).
    """
    rows: list[Row] = []
    for path, n in parse_spec(spec):
        file_rows = _load_file(path, ignore_bad_rows=ignore_bad_rows)
        if n is not None:
            file_rows = sample_rows(file_rows, n, seed=seed)
        rows.extend(file_rows)
    return rows


def sample_rows(rows: list[Row], n: int, *, seed: int) -> list[Row]:
    """ms-swift's ``#N``: whole copies for ``n >= len(rows)``, then a seeded random subset."""
    if not rows:
        return []
    rng = np.random.default_rng(seed)
    repeats, rest = divmod(n, len(rows))
    picked = list(range(len(rows))) * repeats
    picked += rng.permutation(len(rows))[:rest].tolist()
    return [rows[i] for i in picked]


def split_rows(rows: list[Any], split_dataset_ratio: float, seed: int = 42) -> tuple[list[Any], list[Any]]:
    """Hold out ``ceil(ratio * len(rows))`` seeded-random rows; both parts keep file order."""
    ratio = float(split_dataset_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"--split_dataset_ratio {ratio}: must be in [0, 1), e.g. 0.01")
    if ratio == 0.0 or not rows:
        return (list(rows) if isinstance(rows, list) else rows), []
    n_val = math.ceil(ratio * len(rows))
    if n_val >= len(rows):
        raise ConfigError(
            f"--split_dataset_ratio {ratio} leaves no training rows out of {len(rows)}; lower it"
        )
    val_idx = set(np.random.default_rng(seed).permutation(len(rows))[:n_val].tolist())
    train_idx = [i for i in range(len(rows)) if i not in val_idx]
    if not isinstance(rows, list):  # rows read when used (several hosts): views, reading nothing now
        return Picks([(rows, i) for i in train_idx]), Picks([(rows, i) for i in sorted(val_idx)])
    return [rows[i] for i in train_idx], [rows[i] for i in sorted(val_idx)]


def _load_file(path: str, *, ignore_bad_rows: bool) -> list[Row]:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder; check the --dataset path")
    if os.path.isdir(path):
        return _load_saved(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return list(_iter_jsonl(path, ignore_bad_rows=ignore_bad_rows))
    if ext in (".json", ".csv", ".parquet"):
        return _load_with_datasets(path, ext[1:])
    raise DataError(f"{path}: unsupported dataset format {ext or '(no extension)'}; use {SUPPORTED}")


def _iter_jsonl(path: str, *, ignore_bad_rows: bool) -> Iterator[Row]:
    # Read bytes and decode line by line, so that a non-UTF-8 byte is a bad row named like the others.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if _blank(raw):
                continue
            row = parse_jsonl_line(raw, path, lineno)
            if row.error is not None and not ignore_bad_rows:
                raise DataError(f"{path} line {lineno}: {row.error}; fix the line or pass --ignore_bad_rows")
            yield row


def _blank(raw: bytes) -> bool:
    """A line holding only whitespace (a line that is not UTF-8 is not blank: it is a bad row)."""
    try:
        return not raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def parse_jsonl_line(raw: bytes, path: str, lineno: int) -> Row:
    """One non-blank line of a ``.jsonl`` file as a :class:`Row`; ``error`` says why it is not a JSON object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Row({}, path, lineno, is_jsonl=True, error=f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Row({}, path, lineno, is_jsonl=True, error=f"bad JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return Row({}, path, lineno, is_jsonl=True, error=f"expected a JSON object, got {type(obj).__name__}")
    return Row(obj, path, lineno, is_jsonl=True)


class JsonlLines(LazySequence):
    """The non-blank lines of a ``.jsonl`` file, each parsed into a :class:`Row` only when read (a bad line is a
    row with ``error`` set): on several hosts each parses only the rows it validates (``parsed`` counts them)."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._lines = [(n, raw) for n, raw in enumerate(f, start=1) if not _blank(raw)]
        self.path, self.parsed = path, 0

    def __len__(self) -> int:
        return len(self._lines)

    def item(self, i: int) -> Row:
        lineno, raw = self._lines[i]
        self.parsed += 1
        return parse_jsonl_line(raw, self.path, lineno)


class Picks(LazySequence):
    """Items picked from other sequences and read through to them (``refs``: (sequence, index) pairs): rows of
    several files, or the train and validation parts of lazily read rows."""

    def __init__(self, refs: list[tuple[Sequence[Any], int]]):
        self._refs = refs

    def __len__(self) -> int:
        return len(self._refs)

    def item(self, i: int):
        rows, j = self._refs[i]
        return rows[j]


def load_dataset_rows_lazily(spec: str, *, seed: int = 42) -> Picks:
    """:func:`load_dataset_rows`'s rows, with the lines of ``.jsonl`` files parsed only when read (other formats
    are read whole by ``datasets``). A bad line is a row with ``error`` set, reported where it is validated."""
    refs: list[tuple[Sequence[Any], int]] = []
    for path, n in parse_spec(spec):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or folder; check the --dataset path")
        lazy = not os.path.isdir(path) and os.path.splitext(path)[1].lower() == ".jsonl"
        rows = JsonlLines(path) if lazy else _load_file(path, ignore_bad_rows=True)
        picks = list(range(len(rows)))
        if n is not None:
            picks = sample_rows(picks, n, seed=seed)
        refs.extend((rows, i) for i in picks)
    return Picks(refs)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_with_datasets(path: str, builder: str) -> list[Row]:
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train")
        except Exception as e:  # datasets raises many kinds; report one line
            hint = _json_hint(path, builder, e)
            raise DataError(f"{path}: cannot read as {builder} ({hint}); fix the file") from None
    return [Row(dict(d), path, i) for i, d in enumerate(ds.to_list())]


def _load_saved(path: str) -> list[Row]:
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(
                f"{path}: a folder but not one saved by datasets.save_to_disk ({_first_line(e)}); use {SUPPORTED}"
            ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: a DatasetDict with splits {sorted(ds)} and no 'train'; save one split")
    return [Row(dict(d), path, i) for i, d in enumerate(ds.to_list())]


def _json_hint(path: str, builder: str, e: Exception) -> str:
    if builder == "json":
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as je:
            return f"bad JSON at line {je.lineno} column {je.colno}: {je.msg}"
        except (OSError, UnicodeDecodeError):
            pass
    return _first_line(e)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
