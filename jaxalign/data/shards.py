"""A dataset's encoded rows spread over hosts: each host tokenises one shard, the hosts exchange the lengths, and
each host encodes on demand the rows its batch slots need.

Every host parses the whole file (cheap next to tokenising it) and so holds every row's :class:`Example`. Host
``p`` of ``P`` encodes rows ``p, p + P, p + 2P, ...`` and keeps them; one all-gather of a small integer per row
(the encoded length, or why the row was dropped) gives every host the same list of kept rows and their lengths.
The batch order, a function of the seed and the lengths only, is then the same on every host and for any number
of hosts; a row outside the host's shard is encoded when one of the host's batch slots needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxalign.data.encode import EncodedExample, Encoder, EncodeStats, KTOExample
from jaxalign.data.formats import Example
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


class EncodedRows(Sequence):
    """The kept rows of a dataset in file order, as a sequence of :class:`EncodedExample`: ``lengths`` holds
    every row's length; a row is encoded when read unless this host encoded it already (its shard)."""

    def __init__(self, examples: Sequence[Example], kept: np.ndarray, lengths: np.ndarray, encoder: Encoder,
                 encoded: dict[int, EncodedExample], prompt_lengths: np.ndarray | None = None):
        self._examples, self._kept, self.lengths = examples, kept, lengths
        self._encoder, self._encoded = encoder, encoded
        self.prompt_lengths = prompt_lengths  # KTO rows: the prompt's share of each length (for the KL pairs)

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def encoded_here(self) -> int:
        """How many of the kept rows this host encoded up front (its shard)."""
        return len(self._encoded)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = int(self._kept[i])
        if row in self._encoded:
            return self._encoded[row]
        enc = self._encoder.encode(self._examples[row])
        assert enc is not None and enc.length == self.lengths[i], f"row {row} encoded differently on this host"
        return enc


class AnnotatedRows(Sequence):
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

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return dataclasses.replace(self._rows[i], **{k: float(v[i]) for k, v in self._fields.items()})


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
    kto = encoder.kind == "kto"
    return EncodedRows(examples, kept, codes[kept], encoder, encoded, prompts[kept] if kto else None), stats
