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
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxalign.data.rows import Row
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
        return list(rows), []
    n_val = math.ceil(ratio * len(rows))
    if n_val >= len(rows):
        raise ConfigError(
            f"--split_dataset_ratio {ratio} leaves no training rows out of {len(rows)}; lower it"
        )
    val_idx = set(np.random.default_rng(seed).permutation(len(rows))[:n_val].tolist())
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val


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
            error, obj = None, None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line, error = None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})"
            if line is not None and not line.strip():
                continue
            if error is None:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    error = f"bad JSON ({e.msg} at column {e.colno})"
            if error is None and not isinstance(obj, dict):
                error = f"expected a JSON object, got {type(obj).__name__}"
            if error is not None:
                if not ignore_bad_rows:
                    raise DataError(f"{path} line {lineno}: {error}; fix the line or pass --ignore_bad_rows")
                yield Row({}, path, lineno, is_jsonl=True, error=error)
            else:
                yield Row(obj, path, lineno, is_jsonl=True)


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
