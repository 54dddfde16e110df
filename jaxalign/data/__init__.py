"""Datasets in ms-swift's formats: loading, validation, chat templates, masks, batches."""

from jaxalign.data.batching import BatchIterator, bucket_for, make_buckets
from jaxalign.data.collate import (
    collate,
    collate_kto,
    collate_pair,
    collate_prompt,
    collate_sft,
    kl_rotation,
    required_length,
)
from jaxalign.data.encode import (
    LOSS_SCALES,
    TRUNCATION_STRATEGIES,
    EncodedExample,
    Encoder,
    EncodeStats,
    KTOExample,
    PairExample,
    PromptExample,
    SFTExample,
)
from jaxalign.data.formats import TASK_KINDS, Example, normalize_rows, task_kind
from jaxalign.data.loading import load_dataset_rows, parse_spec, sample_rows, split_rows
from jaxalign.data.prepare import PreparedData, load_examples, prepare_data
from jaxalign.data.rows import Row
from jaxalign.data.template import PLAIN_TEMPLATE, ChatRenderer

__all__ = [
    "BatchIterator",
    "ChatRenderer",
    "EncodeStats",
    "EncodedExample",
    "Encoder",
    "Example",
    "KTOExample",
    "LOSS_SCALES",
    "PLAIN_TEMPLATE",
    "PairExample",
    "PreparedData",
    "PromptExample",
    "Row",
    "SFTExample",
    "TASK_KINDS",
    "TRUNCATION_STRATEGIES",
    "bucket_for",
    "collate",
    "collate_kto",
    "collate_pair",
    "collate_prompt",
    "collate_sft",
    "kl_rotation",
    "load_dataset_rows",
    "load_examples",
    "make_buckets",
    "normalize_rows",
    "parse_spec",
    "prepare_data",
    "required_length",
    "sample_rows",
    "split_rows",
    "task_kind",
]
