"""Metrics out: a tqdm bar, ``logging.jsonl``, optional TensorBoard, and ``curves.png`` at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
from tqdm import tqdm


class MetricsLogger:
    """Writes one JSON object per logging step and keeps the history for the curves.

    A run starting at ``initial_step`` (a resume) keeps the rows of ``logging.jsonl`` up to that step
    and drops later ones (the steps a killed run logged after its checkpoint, which the resumed run
    logs again), so the log holds each step once and the curves cover the whole run; a fresh run
    (step 0) starts an empty log.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, *, report_to: str = "none", initial_step: int = 0):
        self.dir = Path(output_dir)
        self.main = jax.process_index() == 0
        self.history: list[dict] = []
        self._file = None
        self._tb = None
        self._bar = None
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.history = truncate_log(self.dir / "logging.jsonl", initial_step)
            self._file = open(self.dir / "logging.jsonl", "a")
            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train")
            if report_to == "tensorboard":
                self._tb = _tensorboard_writer(self.dir / "runs")
        self._start = time.time()

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        row["elapsed_time"] = round(time.time() - self._start, 3)
        self.history.append(row)
        if not self.main:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.write(json.dumps(row))

    def close(self, curve_keys=("loss",)) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        plot_curves(self.history, self.dir / "curves.png", curve_keys)


def truncate_log(path: Path, last_step: int) -> list[dict]:
    """Keep the rows of the JSONL log at ``path`` with ``step <= last_step`` (rewritten atomically);
    returns them. A line that does not parse (a torn last write) is dropped."""
    if not path.exists():
        return []
    kept, lines = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(row)
            lines.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return kept


def _plain(v):
    """A JSON-ready value: ints stay ints, numbers become floats, NaN/inf become strings."""
    if isinstance(v, (bool, int)):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else str(f)


def _tensorboard_writer(path: Path):
    """A TensorBoard event writer into ``path``: tensorboardX's (no torch needed), else torch's; None (with a
    notice) when neither is installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("jaxalign: --report_to tensorboard needs `pip install tensorboardX` (or jaxalign's [tensorboard] "
                  "extra); logging to logging.jsonl only")
            return None
    return SummaryWriter(str(path))


def plot_curves(history: list[dict], path: Path, keys) -> None:
    """One panel per metric in ``keys`` (those present) against step; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in history)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in history if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
