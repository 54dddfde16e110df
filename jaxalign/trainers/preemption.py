"""SIGTERM (a preemption notice) and SIGINT during training: finish the step, save, stop.

On one host the Trainer catches both signals while its loop runs and checks after every step. On
several hosts the checkpoint save is collective, so every host must stop at the same step, whichever
host got the signal: JAX's preemption sync manager (started by ``jax.distributed.initialize()``)
catches SIGTERM on any host, and :func:`orbax.checkpoint.multihost.reached_preemption` turns True
on every host at the same step. There the Python handlers stay off, so as not to replace JAX's.
"""

from __future__ import annotations

import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """``with PreemptionGuard() as guard:`` ... ``if guard.should_stop(step):`` save and stop."""

    def __init__(self, multi_host: bool | None = None):
        self.multi_host = jax.process_count() > 1 if multi_host is None else multi_host
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionGuard":
        if not self.multi_host and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without the checkpoint
        self.signum = signum

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (on several hosts: the same answer on every host)."""
        if self.multi_host:
            from orbax.checkpoint import multihost

            if multihost.reached_preemption(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None
