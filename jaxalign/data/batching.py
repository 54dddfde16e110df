"""Length buckets and a deterministic, resumable batch iterator with fixed batch shapes.

Every example is assigned to the smallest bucket that holds it; a batch takes rows from one
bucket only and is padded to that bucket's length, so the train step compiles once per
bucket. The order is a pure function of ``(seed, epoch)``: each epoch shuffles the rows
with ``seed + epoch``, cuts each bucket into batches and shuffles the batches. ``state()``
is ``{"epoch", "position"}``; ``restore(state)`` continues the exact same sequence.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxalign.data.collate import (collate, collate_kto_rows, collate_pair_shared, kl_rotation,
                                  pair_shared_widths, required_length, widen_pair_shared)
from jaxalign.data.encode import EncodedExample, KTOExample, PairExample
from jaxalign.errors import ConfigError


def make_buckets(max_length: int, *, min_length: int = 64, buckets: Sequence[int] | None = None) -> list[int]:
    """Bucket lengths: ``buckets`` if given (sorted), else powers of two from ``min_length``
    below ``max_length``, then ``max_length`` itself (e.g. 2048 -> 64, 128, ..., 2048)."""
    if buckets:
        out = sorted({int(b) for b in buckets})
        if out[0] < 1:
            raise ConfigError(f"buckets {list(buckets)}: lengths must be positive")
        return out
    if max_length < 1:
        raise ConfigError(f"--max_length {max_length}: must be positive")
    out = []
    b = max(1, int(min_length))
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(int(max_length))
    return out


def parse_buckets(spec: str | None) -> list[int] | None:
    """``--length_buckets "512,1024,2048"`` -> [512, 1024, 2048]; None keeps the default buckets."""
    if not spec:
        return None
    try:
        return [int(b) for b in str(spec).replace(" ", "").split(",") if b]
    except ValueError:
        raise ConfigError(f"--length_buckets {spec!r}: expected comma-separated integers, e.g. 512,1024,2048") from None


def stack_micro_batches(batches: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """[A] batches of possibly different bucket lengths -> arrays [A, B, ...] padded to the longest (shared-prefix
    preference batches re-laid to the widest prompt and reply slots)."""
    if "chosen_loss_mask" in batches[0] and "input_ids" in batches[0]:
        prompts, replies = zip(*(pair_shared_widths(b) for b in batches))
        batches = [widen_pair_shared(b, max(prompts), max(replies), pad_id) for b in batches]
    out = {}
    for key in batches[0]:
        if key == "extras":
            continue
        arrays = [np.asarray(b[key]) for b in batches]
        if arrays[0].ndim >= 2:
            length = max(a.shape[1] for a in arrays)
            fill = pad_id if key.endswith("input_ids") else 0
            arrays = [
                np.pad(a, ((0, 0), (0, length - a.shape[1])) + ((0, 0),) * (a.ndim - 2), constant_values=fill)
                for a in arrays
            ]
        out[key] = np.stack(arrays)
    return out


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket length >= ``length``."""
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise ConfigError(
            f"a sequence of {length} tokens is longer than the largest bucket ({buckets[-1]}); "
            "raise --max_length or use --truncation_strategy delete|left|right"
        )
    return int(buckets[i])


class BatchIterator:
    """Endless iterator of fixed-shape numpy batches over ``examples``, epoch after epoch.

    ``len(it)`` is the number of batches per epoch. With ``drop_last`` each bucket's last
    incomplete batch is dropped (every batch has ``batch_size`` rows); without it that batch
    is yielded short. ``host_rows=(lo, hi)`` makes each (full) batch hold only rows ``lo:hi`` of the global batch (this
    host's slots): only those rows are read from ``examples``, and the padded length comes from every row's
    length (``examples.lengths`` when it has them, see :class:`jaxalign.data.shards.EncodedRows`), so all hosts
    agree on shapes. A KTO row's KL pair takes the completion of the row before it in the whole batch, so a
    host reads those partner rows too, and the padded length counts every pair (from ``prompt_lengths``).
    """

    def __init__(
        self,
        examples: Sequence[EncodedExample],
        batch_size: int,
        buckets: Sequence[int],
        seed: int,
        drop_last: bool = True,
        *,
        pad_id: int = 0,
        host_rows: tuple[int, int] | None = None,
        shared_prefix: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size}: must be at least 1")
        self.examples = examples
        self.batch_size = int(batch_size)
        self.buckets = sorted(int(b) for b in buckets)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.pad_id = int(pad_id)
        self.host_rows = None if host_rows is None or tuple(host_rows) == (0, self.batch_size) else tuple(host_rows)
        lengths = getattr(examples, "lengths", None)
        self.lengths = np.asarray(lengths if lengths is not None else [ex.length for ex in examples], np.int64)
        # KTO: each row's prompt length too, for the length of its KL pair (prompt i + completion i-1)
        self.prompt_lengths = None
        if len(self.lengths) and isinstance(examples[0], KTOExample):
            prompts = getattr(examples, "prompt_lengths", None)
            self.prompt_lengths = np.asarray(
                prompts if prompts is not None else [ex.prompt_ids.shape[0] for ex in examples], np.int64)
        # preference pairs with shared_prefix: each row's shared prompt length, for the shared-prefix layout
        self.pair_prompts = None
        if shared_prefix and len(self.lengths) and isinstance(examples[0], PairExample):
            prompts = getattr(examples, "prompt_lengths", None)
            self.pair_prompts = np.asarray(
                prompts if prompts is not None else [ex.shared_prompt_length for ex in examples], np.int64)
        self._bucket_of = np.asarray([bucket_for(int(n), self.buckets) for n in self.lengths], dtype=np.int64)
        self.epoch = 0
        self.position = 0
        self._plan_epoch = -1
        self._plan: list[np.ndarray] = []
        if len(self) == 0:
            raise ConfigError(
                f"{len(self.lengths)} usable rows cannot fill one batch of {batch_size} per length bucket; "
                "lower the batch size or add data"
            )

    def __len__(self) -> int:
        counts = np.unique(self._bucket_of, return_counts=True)[1] if len(self.lengths) else []
        return int(sum(c // self.batch_size if self.drop_last else -(-c // self.batch_size) for c in counts))

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The row indices of every batch of ``epoch``, in order."""
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(len(self.lengths))
        batches: list[np.ndarray] = []
        for bucket in self.buckets:
            rows = order[self._bucket_of[order] == bucket]
            stop = len(rows) - len(rows) % self.batch_size if self.drop_last else len(rows)
            batches.extend(rows[i : i + self.batch_size] for i in range(0, stop, self.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def state(self) -> dict[str, int]:
        """Where the iterator is: the epoch and the index of the next batch in it."""
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state` (e.g. one saved in a checkpoint)."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self.epoch_plan(self.epoch), self.epoch
        if self.position >= len(self._plan):
            self.epoch, self.position = self.epoch + 1, 0
            return next(self)
        idx = self._plan[self.position]
        self.position += 1
        return self.make_batch(idx)

    def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of one epoch (e.g. an evaluation pass), leaving :meth:`state` alone."""
        for idx in self.epoch_plan(epoch):
            yield self.make_batch(idx)

    def pair_widths(self, indices) -> tuple[int, int] | None:
        """(prompt, reply) slot widths of a shared-prefix preference batch of rows ``indices`` (every row's, on
        every host): the buckets of the longest shared prompt and the longest reply; None (a plain batch, a
        sequence per reply) when the iterator does not share prefixes, a row's chosen and rejected share no
        prompt token, or the buckets make the shared row no shorter than two plain ones."""
        if self.pair_prompts is None:
            return None
        idx = np.asarray(indices)
        prompts = self.pair_prompts[idx]
        if prompts.min() < 1:
            return None
        widths = (bucket_for(int(prompts.max()), self.buckets),
                  bucket_for(int((self.lengths[idx] - prompts).max()), self.buckets))
        plain = bucket_for(int(self.lengths[idx].max()), self.buckets)
        return widths if widths[0] + 2 * widths[1] < 2 * plain else None

    def make_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Collate the rows ``indices`` into one batch of this iterator's shapes."""
        widths = self.pair_widths(indices)
        if self.host_rows is None:
            rows = [self.examples[i] for i in indices]
            if widths is not None:
                return collate_pair_shared(rows, *widths, self.pad_id)
            return collate(rows, bucket_for(required_length(rows, self.buckets[-1]), self.buckets), self.pad_id)
        if len(indices) != self.batch_size:
            raise ConfigError(f"a short batch ({len(indices)} of {self.batch_size} rows) cannot be split over hosts")
        lo, hi = self.host_rows
        idx = np.asarray(indices)
        longest = int(self.lengths[idx].max())
        if widths is not None:
            return collate_pair_shared([self.examples[i] for i in idx[lo:hi]], *widths, self.pad_id)
        if self.prompt_lengths is None:
            return collate([self.examples[i] for i in idx[lo:hi]], bucket_for(longest, self.buckets), self.pad_id)
        # KTO, as required_length counts it: every row and every KL pair of the whole batch
        partner = idx[kl_rotation(len(idx))]
        kl = self.prompt_lengths[idx] + self.lengths[partner] - self.prompt_lengths[partner]
        length = bucket_for(max(longest, int(np.minimum(kl, self.buckets[-1]).max())), self.buckets)
        rows = [self.examples[i] for i in idx[lo:hi]]
        return collate_kto_rows(rows, [self.examples[i] for i in partner[lo:hi]], length, self.pad_id)
