"""One call from `--dataset` flags to encoded train/val examples, with drop counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jaxalign.data.encode import EncodedExample, Encoder
from jaxalign.data.formats import Example, normalize_rows
from jaxalign.data.loading import load_dataset_rows, load_dataset_rows_lazily, split_rows
from jaxalign.data.rows import RenamedRows
from jaxalign.data.shards import EncodedRows, HostShard, encode_rows, normalize_on_hosts, this_host


@dataclass
class PreparedData:
    """Encoded train and validation examples, and what was dropped on the way (over all hosts)."""

    train: EncodedRows | list[EncodedExample]
    val: EncodedRows | list[EncodedExample]
    stats: dict[str, int] = field(default_factory=dict)


def load_examples(
    spec: str, task: str, *, seed: int = 42, ignore_bad_rows: bool = False, shard: HostShard = HostShard(),
    columns: dict[str, str] | None = None,
) -> tuple[Sequence[Example], int]:
    """Load and validate ``spec`` for ``task`` with its columns renamed by ``columns`` (``--columns``); returns
    (examples, number of bad rows skipped). On several hosts each parses and validates only its ``shard`` of the
    rows (:func:`jaxalign.data.shards.normalize_on_hosts`)."""
    if shard.count > 1:
        rows = load_dataset_rows_lazily(spec, seed=seed)
        return normalize_on_hosts(RenamedRows(rows, columns) if columns else rows, task, shard,
                                  ignore_bad_rows=ignore_bad_rows)
    rows = load_dataset_rows(spec, seed=seed, ignore_bad_rows=ignore_bad_rows)
    return normalize_rows(RenamedRows(rows, columns) if columns else rows, task, ignore_bad_rows=ignore_bad_rows)


def prepare_data(
    dataset: str,
    task: str,
    tokenizer: Any,
    *,
    val_dataset: str | None = None,
    split_dataset_ratio: float = 0.0,
    data_seed: int = 42,
    template: str | None = None,
    model_type: str | None = None,
    max_length: int | None = 2048,
    truncation_strategy: str | None = None,
    loss_scale: str = "last_round",
    ignore_bad_rows: bool = False,
    shard: HostShard | None = None,
    columns: dict[str, str] | None = None,
) -> PreparedData:
    """Load, validate, split (``--split_dataset_ratio`` unless ``--val_dataset``) and encode.

    ``stats`` counts ``bad_rows`` (skipped under ``ignore_bad_rows``), ``deleted_too_long``
    (``truncation_strategy`` delete), ``no_loss_tokens`` (truncation left no trained token),
    and the final ``train`` and ``val`` sizes. On several hosts each parses, validates and tokenises only its
    ``shard`` of the rows up front (see :mod:`jaxalign.data.shards`); the result is the same on every host.
    """
    encoder = Encoder(
        tokenizer,
        template=template,
        model_type=model_type,
        max_length=max_length,
        truncation_strategy=truncation_strategy,
        loss_scale=loss_scale,
        kind=task,
    )
    shard = this_host() if shard is None else shard
    train_ex, bad = load_examples(dataset, task, seed=data_seed, ignore_bad_rows=ignore_bad_rows, shard=shard,
                                  columns=columns)
    if val_dataset:
        val_ex, bad_val = load_examples(val_dataset, task, seed=data_seed, ignore_bad_rows=ignore_bad_rows,
                                        shard=shard, columns=columns)
        bad += bad_val
    else:
        train_ex, val_ex = split_rows(train_ex, split_dataset_ratio, data_seed)
    train, s_train = encode_rows(encoder, train_ex, shard)
    val, s_val = encode_rows(encoder, val_ex, shard)
    stats = {
        "bad_rows": bad,
        "deleted_too_long": s_train.deleted_too_long + s_val.deleted_too_long,
        "no_loss_tokens": s_train.no_loss_tokens + s_val.no_loss_tokens,
        "train": len(train),
        "val": len(val),
    }
    return PreparedData(train, val, stats)
