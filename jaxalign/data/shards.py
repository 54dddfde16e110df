"""A dataset's rows spread over hosts: each host parses, validates and tokenises one shard, the hosts exchange a
flag and then a length per row, and each host reads on demand the rows its batch slots need.

Host ``p`` of ``P`` parses and validates rows ``p, p + P, ...`` of the file (:func:`normalize_on_hosts`); one
all-gather of a flag per row gives every host the same valid rows, the others parsed when read. It then encodes
rows ``p, p + P, p + 2P, ...`` of the valid rows and keeps them; one all-gather of a small integer per row
(the encoded length, or why the row was dropped) gives every host the same list of kept rows and their lengths.
The batch order, a function of the seed and the lengths only, is then the same on every host and for any number
of hosts; a row outside the host's shard is encoded when one of the host's batch slots needs it.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxalign.data.encode import EncodedExample, Encoder, EncodeStats, KTOExample, PairExample
from jaxalign.data.formats import BadRow, Example, normalize_row, normalize_rows, task_kind, task_name
from jaxalign.data.rows import LazySequence, Row
from jaxalign.errors import DataError

# What the exchanged code of a row means when it is not a positive length.
NOT_MINE, DELETED_TOO_LONG, NO_LOSS_TOKENS, FAILED = 0, -1, -2, -3


def _alone(x: np.ndarray) -> np.ndarray:
    return np.asarray(x)[None]


@dataclasses.dataclass(frozen=True)
class HostShard:
    """This host's place among ``count`` hosts, and the all-gather that joins them ([N] -> [count, N])."""

    index: int = 0
    count: int = 1
    gather: Callable[[np.ndarray], np.ndarray] = _alone


def this_host() -> HostShard:
    """The running process among all of the run's processes (one per host)."""
    import jax

    if jax.process_count() == 1:
        return HostShard()
    from jax.experimental import multihost_utils

    return HostShard(jax.process_index(), jax.process_count(), lambda x: np.asarray(multihost_utils.process_allgather(x)))


class KeptRows(LazySequence):
    """The rows ``kept`` of a ``source`` sequence, each made from its source row when read (:meth:`make`) unless
    this host made it up front, in its shard (``done``: source index -> item)."""

    def __init__(self, source: Sequence, kept: np.ndarray, done: dict[int, Any]):
        self._source, self._kept, self._done = source, kept, done

    def __len__(self) -> int:
        return len(self._kept)

    @abstractmethod
    def make(self, row: int, i: int):
        """Make kept row ``i`` from source row ``row``."""

    def item(self, i: int):
        row = int(self._kept[i])
        return self._done[row] if row in self._done else self.make(row, i)


class EncodedRows(KeptRows):
    """The kept rows of a dataset in file order, as a sequence of :class:`EncodedExample`: ``lengths`` holds
    every row's length; a row is encoded when read unless this host encoded it already (its shard)."""

    def __init__(self, examples: Sequence[Example], kept: np.ndarray, lengths: np.ndarray, encoder: Encoder,
                 encoded: dict[int, EncodedExample], prompt_lengths: np.ndarray | None = None):
        super().__init__(examples, kept, encoded)
        self.lengths, self._encoder = lengths, encoder
        # KTO rows: the prompt's share of each length (for the KL pairs); pairs: the prompt chosen and rejected share
        self.prompt_lengths = prompt_lengths

    @property
    def encoded_here(self) -> int:
        """How many of the kept rows this host encoded up front (its shard)."""
        return len(self._done)

    def make(self, row: int, i: int):
        enc = self._encoder.encode(self._source[row])
        assert enc is not None and enc.length == self.lengths[i], f"row {row} encoded differently on this host"
        return enc


class AnnotatedRows(LazySequence):
    """``rows`` with per-row values set on each example when it is read (``fields``: name -> [len(rows)] array),
    so that annotating every row (the reference log-probs of ``--precompute_ref_log_probs``) does not encode the
    rows outside this host's shard; ``lengths``, ``prompt_lengths`` and ``encoded_here`` are ``rows``'."""

    def __init__(self, rows: Sequence[EncodedExample], fields: dict[str, np.ndarray]):
        self._rows, self._fields = rows, fields
        self.lengths = getattr(rows, "lengths", None)
        self.prompt_lengths = getattr(rows, "prompt_lengths", None)
        self.encoded_here = getattr(rows, "encoded_here", len(rows))

    def __len__(self) -> int:
        return len(self._rows)

    def item(self, i: int):
        return dataclasses.replace(self._rows[i], **{k: float(v[i]) for k, v in self._fields.items()})


class NormalizedRows(KeptRows):
    """The valid rows of a dataset as :class:`Example`, in file order; a row is validated when read unless this
    host validated it already (its shard)."""

    def __init__(self, rows: Sequence[Row], kept: np.ndarray, task: str, done: dict[int, Example]):
        super().__init__(rows, kept, done)
        self._kind, self._name = task_kind(task), task_name(task)

    def make(self, row: int, i: int):
        return normalize_row(self._source[row], self._kind, name=self._name)


def normalize_on_hosts(rows: Sequence[Row], task: str, shard: HostShard, *, ignore_bad_rows: bool = False
                       ) -> tuple[NormalizedRows, int]:
    """:func:`jaxalign.data.formats.normalize_rows` over hosts: host ``p`` parses and validates rows ``p, p + P,
    ...`` of ``rows`` (read lazily, :func:`jaxalign.data.loading.load_dataset_rows_lazily`) and one all-gather of
    a flag per row gives every host the same valid rows. A bad row, unless ``ignore_bad_rows``, raises the same
    error on every host (the first bad row in file order, which each host validates again to name it)."""
    kind, name = task_kind(task), task_name(task)
    flags = np.zeros(len(rows), np.int64)  # 1 valid, -1 bad, 0 another host's row
    done: dict[int, Example] = {}
    for i in range(shard.index, len(rows), shard.count):
        row = rows[i]
        try:
            if row.error is not None:
                raise BadRow(row.error)
            done[i], flags[i] = normalize_row(row, kind, name=name), 1
        except BadRow:
            flags[i] = -1
    flags = shard.gather(flags).sum(axis=0)
    bad = np.flatnonzero(flags < 0)
    if len(bad) and not ignore_bad_rows:
        first = rows[int(bad[0])]
        normalize_rows([first], task)  # raises that row's error here too
        raise DataError(f"{first.where}: not a valid {name} row; fix the row or pass --ignore_bad_rows")
    return NormalizedRows(rows, np.flatnonzero(flags > 0), task, done), len(bad)


def encode_rows(encoder: Encoder, examples: Sequence[Example], shard: HostShard = HostShard()
                ) -> tuple[EncodedRows, EncodeStats]:
    """Encode this host's shard of ``examples``, exchange the outcomes, and return every kept row (encoded on
    demand outside the shard) with the drop counts over all hosts. A row that fails to encode raises the same
    error on every host (each re-encodes it to name it), so no host is left waiting for the others."""
    codes = np.zeros(len(examples), np.int64)
    prompts = np.zeros(len(examples), np.int64)  # KTO rows' prompt lengths
    encoded: dict[int, EncodedExample] = {}
    for row in range(shard.index, len(examples), shard.count):
        stats = EncodeStats()
        try:
            enc = encoder.encode(examples[row], stats)
        except Exception:  # reported below, on every host
            codes[row] = FAILED
            continue
        if enc is not None:
            codes[row], encoded[row] = enc.length, enc
            if isinstance(enc, KTOExample):
                prompts[row] = enc.prompt_ids.shape[0]
            elif isinstance(enc, PairExample):
                prompts[row] = enc.shared_prompt_length
        else:
            codes[row] = DELETED_TOO_LONG if stats.deleted_too_long else NO_LOSS_TOKENS
    # every row's code comes from its one owner; the rest add 0
    codes, prompts = shard.gather(np.stack([codes, prompts])).sum(axis=0)
    failed = np.flatnonzero(codes == FAILED)
    if len(failed):
        encoder.encode(examples[int(failed[0])])  # raises the row's own error here too
        raise DataError(f"{examples[int(failed[0])].where}: could not be encoded")
    kept = np.flatnonzero(codes > 0)
    stats = EncodeStats(encoded=len(kept), deleted_too_long=int(np.sum(codes == DELETED_TOO_LONG)),
                        no_loss_tokens=int(np.sum(codes == NO_LOSS_TOKENS)))
    prompted = encoder.kind in ("kto", "pair")
    return EncodedRows(examples, kept, codes[kept], encoder, encoded, prompts[kept] if prompted else None), stats
