"""The one training loop: state, optimizer, compiled step, resume, logs, checkpoints, hooks, export.

Every algorithm (SFT, the preference family, KTO, RM, GRPO, PPO) runs through :class:`Trainer`.
The algorithm supplies the loss (``loss_fn``/``totals_fn``/``extra``) and ``run_step``, which
produces the next logged step's metrics by feeding one or more batches to
:meth:`Trainer.train_step` — from the data (offline), or from a rollout (GRPO, PPO). Evaluation and
sample logging are hooks with an interval (:meth:`Trainer.add_hook`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx

from jaxalign.data.batching import BatchIterator, make_buckets, parse_buckets, stack_micro_batches
from jaxalign.data.tokenizer import pad_id_of
from jaxalign.errors import ConfigError, JaxalignError, Preempted, TrainingDiverged
from jaxalign.models.attention import check_impl
from jaxalign.models.decoder import set_attn_impl, set_remat
from jaxalign.models.lora import cast_frozen, trainable_summary
from jaxalign.parallel.activations import mesh_context
from jaxalign.parallel.distributed import host_rows
from jaxalign.parallel.mesh import mesh_platform
from jaxalign.parallel.rules import batch_sharding
from jaxalign.convert.checkpoint_io import read_meta
from jaxalign.trainers.checkpoint import (
    CheckpointWriter,
    list_checkpoints,
    remove_interrupted_saves,
    resolve_resume,
    restore_state,
    run_meta,
    write_run_files,
)
from jaxalign.trainers.logging import MetricsLogger, truncate_log
from jaxalign.trainers.optim import build_optimizer
from jaxalign.trainers.preemption import PreemptionGuard
from jaxalign.trainers.step import (
    CompileCounter,
    accumulation_sharding,
    build_eval_step,
    build_train_step,
    create_train_state,
    jit_train_step,
    split_model,
    state_shardings,
)

# Logged as the window's last value rather than its mean.
LAST_VALUE_KEYS = ("learning_rate", "lr", "episode")

# What a run writes into output_dir besides checkpoints and the export.
RUN_FILES = ("args.json", "tokenizer", "logging.jsonl", "curves.png", "runs", "completions.jsonl", "samples.jsonl")
# JSONL logs with a "step" per row (GRPO's --log_completions, PPO's debug samples), cut back on a resume.
STEP_LOGS = ("completions.jsonl", "samples.jsonl")


class Algorithm(Protocol):
    """What the Trainer asks of an algorithm; :class:`jaxalign.trainers.algorithm.AlgorithmBase`
    gives the defaults."""

    name: str  # the rlhf_type ("sft" for SFT): its registry entry and data kind
    lora: Any  # LoRASettings under --tuner_type lora, else None
    curve_keys: tuple[str, ...]  # curves.png panels
    per_host_batches: bool  # each host builds only its devices' rows of a data batch (else every host all rows)
    progress_keys: tuple[str, ...]  # shown on the progress bar

    def prepare_model(self, model: nnx.Module, mesh, tokenizer) -> nnx.Module: ...
    def default_accumulation(self, micro_batch: int) -> int: ...
    def rows_per_batch(self, trainer: "Trainer") -> int: ...
    def total_steps(self, trainer: "Trainer") -> int: ...
    def optimizer_steps(self, total_steps: int) -> int: ...
    def setup(self, trainer: "Trainer") -> None: ...
    def run_step(self, trainer: "Trainer") -> dict[str, float]: ...
    def loss_fn(self, model, micro: dict, totals: dict, extra: Any, rng) -> tuple[Any, dict]: ...
    def totals_fn(self, batch: dict) -> dict: ...
    def extra(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def policy(self, module: nnx.Module) -> nnx.Module: ...
    def export(self, trainer: "Trainer") -> None: ...


def split_for_training(model: nnx.Module, cfg, algorithm: Algorithm, mesh):
    """(graphdef, params, rest) of the prepared module: remat as ``--gradient_checkpointing`` and
    ``--remat_policy`` say, attention as ``--attn_impl`` says for the mesh's platform, split into
    what trains and the frozen rest; under LoRA the frozen base in the compute dtype (bfloat16 halves it),
    adapters and Adam's moments staying float32."""
    set_remat(model, cfg.gradient_checkpointing, cfg.remat_policy)
    set_attn_impl(model, check_impl(cfg.get("attn_impl") or "auto", mesh_platform(mesh)))
    graphdef, params, rest = split_model(model)
    if algorithm.lora is not None:
        rest = cast_frozen(rest, cfg.torch_dtype)
    return graphdef, params, rest


def batch_geometry(cfg, algorithm: Algorithm, mesh) -> tuple[int, int, int]:
    """(data-parallel devices, rows per micro-batch over all of them, micro-batches per optimizer step)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.per_device_train_batch_size * dp
    return dp, micro, cfg.gradient_accumulation_steps or algorithm.default_accumulation(micro)


@dataclasses.dataclass
class Hook:
    """``fn(trainer, step) -> metrics or None`` every ``every`` steps (and at the last or first step)."""

    fn: Callable[["Trainer", int], dict | None]
    every: int
    at_end: bool = True
    at_start: bool = False

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == total) or (self.at_start and step == 1)


def hosts_summary(rows, batches: BatchIterator) -> str:
    """What process 0 read and builds, on several hosts."""
    share = getattr(rows, "encoded_here", len(rows))
    out = f"{jax.process_count()} hosts; this one tokenised {share} of {len(rows)} training rows up front"
    if batches.host_rows is None:
        return out + "; every host builds whole batches"
    lo, hi = batches.host_rows
    return out + f" and builds rows {lo}:{hi} of each {batches.batch_size}-row batch"


class Trainer:
    """Runs one algorithm from a loaded model and prepared data to checkpoints and an export."""

    def __init__(self, cfg, algorithm: Algorithm, model: nnx.Module, tokenizer, data, mesh):
        self.cfg, self.algo, self.tokenizer, self.data, self.mesh = cfg, algorithm, tokenizer, data, mesh
        self.out = Path(cfg.output_dir)
        self.main_process = jax.process_index() == 0
        self.pad_id = pad_id_of(tokenizer)
        self.model_config = model.config
        self.graphdef, params, self.rest = split_for_training(model, cfg, algorithm, mesh)
        if algorithm.lora is not None and self.main_process:
            print("jaxalign: " + trainable_summary(params, self.rest))
        self.data_parallel, self.micro_batch, self.accum = batch_geometry(cfg, algorithm, mesh)
        self.eval_batch = cfg.per_device_eval_batch_size * self.data_parallel
        self.buckets = make_buckets(cfg.max_length, buckets=parse_buckets(cfg.length_buckets))
        try:
            rows = algorithm.rows_per_batch(self)
            self.batches = BatchIterator(data.train, rows, self.buckets, seed=cfg.data_seed, pad_id=self.pad_id,
                                         host_rows=self._host_rows(rows), shared_prefix=algorithm.shares_prompts)
        except ConfigError as e:  # too few rows: name the dataset
            raise ConfigError(f"--dataset {cfg.dataset}: {e}") from None
        if jax.process_count() > 1 and self.main_process:
            print("jaxalign: " + hosts_summary(data.train, self.batches), flush=True)
        self.total_steps = algorithm.total_steps(self)
        self.optimizer, self.schedule = build_optimizer(cfg, algorithm.optimizer_steps(self.total_steps))
        self.state = create_train_state(params, self.optimizer, mesh, cfg.seed)
        self.counter = CompileCounter()
        self.eval_counter = CompileCounter()
        self.hooks: list[Hook] = []
        self.history: list[dict] = []
        self.step_fn = None
        self.eval_fn = None
        algorithm.setup(self)

    def add_hook(self, fn: Callable[["Trainer", int], dict | None], every: int, *, at_end: bool = True,
                 at_start: bool = False) -> None:
        """Call ``fn(trainer, step)`` every ``every`` steps; a returned dict is logged at that step."""
        self.hooks.append(Hook(fn, max(int(every), 1), at_end, at_start))

    # ----- compiled functions -------------------------------------------------------------
    def _batch_shardings(self, batch: dict):
        return {k: accumulation_sharding(self.mesh, v.ndim) for k, v in batch.items()}

    def _host_rows(self, rows: int) -> tuple[int, int] | None:
        """This host's rows of a ``rows``-row data batch when the algorithm builds per-host batches."""
        return host_rows(self.mesh, rows) if self.algo.per_host_batches else None

    def place(self, batch: dict, rows: int | None = None) -> dict:
        """Stacked [A, b, ...] numpy arrays on the mesh: the whole batch as it is, or with ``rows`` (the global
        micro-batch) this host's share (its ``host_rows``) joined with the other hosts' into [A, rows, ...].
        An array with fewer rows than the batch's longest (the shared-prefix layout's packed rows) keeps its
        ratio to it: [A, rows * b_k / b, ...]."""
        shardings = self._batch_shardings(batch)
        if rows is None:
            return jax.device_put(batch, shardings)
        most = max(v.shape[1] for v in batch.values())
        return {k: jax.make_array_from_process_local_data(shardings[k], v,
                                                          (v.shape[0], rows * v.shape[1] // most, *v.shape[2:]))
                for k, v in batch.items()}

    def place_rows(self, rows_here: np.ndarray, rows: int) -> jax.Array:
        """A [rows, ...] batch array sharded over (data, fsdp) from this host's rows of it (its ``host_rows``)."""
        sharding = batch_sharding(self.mesh, rows_here.ndim)
        return jax.make_array_from_process_local_data(sharding, rows_here, (rows, *rows_here.shape[1:]))

    def _data_rows(self) -> int | None:
        """The global micro-batch when the data batches hold this host's rows only, else None (whole batches)."""
        return self.micro_batch if self.batches.host_rows is not None else None

    def _step_function(self, batch: dict, extra):
        if self.step_fn is None:
            fn = build_train_step(self.graphdef, self.rest, self.algo.loss_fn, self.algo.totals_fn, self.optimizer,
                                  self.schedule, counter=self.counter)
            self.step_fn = jit_train_step(fn, state_shardings(self.state), self._batch_shardings(batch),
                                          jax.tree.map(lambda x: x.sharding, extra))
        return self.step_fn

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a stacked [A, B, ...] numpy batch; returns device metrics."""
        extra = self.algo.extra()
        batch = self.place(batch, self._data_rows())
        # Traced (and run) under the mesh: the model's activation constraints apply (parallel.activations).
        with mesh_context(self.mesh):
            self.state, metrics = self._step_function(batch, extra)(self.state, batch, extra)
        return metrics

    def lower_step(self, batch: dict):
        """The compiled step's ``jax.stages.Lowered`` for a stacked batch like ``train_step``'s (inspection:
        ``.compile().as_text()``, ``.memory_analysis()``); runs nothing."""
        extra = self.algo.extra()
        batch = self.place(batch, self._data_rows())
        with mesh_context(self.mesh):
            return self._step_function(batch, extra).lower(self.state, batch, extra)

    def step_on(self, batches: list[dict]) -> dict[str, float]:
        """One optimizer step on micro-batches (stacked, padded to the longest); host float metrics."""
        metrics = jax.device_get(self.train_step(stack_micro_batches(batches, self.pad_id)))
        return {k: float(v) for k, v in metrics.items()}

    def eval_metrics(self) -> dict[str, float]:
        """Mean metrics over the validation set (full batches only), prefixed ``eval_``."""
        if not self.data.val:
            return {}
        it = BatchIterator(self.data.val, self.eval_batch, self.buckets, seed=0, pad_id=self.pad_id, drop_last=False,
                           host_rows=self._host_rows(self.eval_batch), shared_prefix=self.algo.shares_prompts)
        extra = self.algo.extra()
        if self.eval_fn is None:
            fn = build_eval_step(self.graphdef, self.rest, self.algo.loss_fn, self.algo.totals_fn)

            def counted(params, batch, extra):
                self.eval_counter.tick()
                return fn(params, batch, extra)

            self.eval_fn = jax.jit(counted)
        sums: dict[str, float] = {}
        n = 0
        for idx in it.epoch_plan(0):
            if len(idx) != self.eval_batch:
                continue
            batch = stack_micro_batches([it.make_batch(idx)], self.pad_id)
            with mesh_context(self.mesh):
                batch = self.place(batch, self.eval_batch if it.host_rows is not None else None)
                m = self.eval_fn(self.state.params, batch, extra)
            m = jax.device_get(m)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {f"eval_{k}": v / n for k, v in sums.items()} if n else {}

    # ----- the loop ---------------------------------------------------------------------
    def resume(self, spec: str) -> int:
        path = resolve_resume(spec, self.out)
        meta = read_meta(path)
        self.state = restore_state(path, self.state)
        self.batches.restore(meta["data_state"])
        self.algo.load_state_dict(meta)
        return int(meta["step"])

    def _meta(self, step: int) -> dict:
        extra = dict(self.algo.state_dict())
        if self.algo.lora is not None:  # what `jaxalign export --ckpt_dir` needs to rebuild the adapters
            extra["lora"] = dataclasses.asdict(self.algo.lora)
        return run_meta(step, self.batches, self.cfg, self.model_config, self.algo.name, **extra)

    def _check_finite(self, step: int, metrics: dict, last_saved: int) -> None:
        """A non-finite loss or gradient norm means this step's update already poisoned the params."""
        loss, grad_norm = metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = f"checkpoint-{last_saved}" if last_saved else "none"
            raise TrainingDiverged(f"step {step}: loss is {loss}, grad_norm is {grad_norm}; stopped without saving "
                                   f"(last good checkpoint: {last}); lower --learning_rate")

    def _window_row(self, window: list[dict], seconds: float) -> dict:
        keys = [k for k in window[0] if k != "num_tokens"]
        row = {k: (window[-1][k] if k in LAST_VALUE_KEYS else float(np.mean([w[k] for w in window if k in w])))
               for k in keys}
        tokens = sum(w.get("num_tokens", 0.0) for w in window)
        if tokens:
            row["tokens_per_second"] = round(tokens / seconds, 2) if seconds > 0 else 0.0
        row["epoch"] = round(self.batches.epoch + self.batches.position / max(len(self.batches), 1), 4)
        row["seconds_per_step"] = round(seconds / len(window), 4)
        row["compilations"] = self.counter.count
        return row

    def train(self) -> list[dict]:
        """Run to ``total_steps`` (from a checkpoint with ``--resume_from_checkpoint``); returns the log rows
        (the whole run's, a resumed run's included).

        SIGTERM or SIGINT finishes the current step, saves it as a checkpoint (after any save in flight)
        and raises :class:`Preempted`. A fresh run stopped by a user mistake (a :class:`JaxalignError`,
        such as a reward function's bad output) before its first checkpoint removes the files it wrote.
        """
        cfg = self.cfg
        fresh = not cfg.resume_from_checkpoint
        existed = self.out.exists()
        before = {name for name in RUN_FILES if (self.out / name).exists()}
        if self.main_process:
            remove_interrupted_saves(self.out)
        try:
            write_run_files(self.out, self.tokenizer, cfg)
            start = self.resume(cfg.resume_from_checkpoint) if not fresh else 0
            self._loop(start)
        except JaxalignError as e:
            if fresh and not isinstance(e, TrainingDiverged) and self.main_process:
                self._remove_run_files(before, existed)
            raise
        return self.history

    def _loop(self, start: int) -> None:
        cfg = self.cfg
        logger = MetricsLogger(self.out, self.total_steps, report_to=cfg.report_to, initial_step=start)
        if self.main_process:  # the per-step sample logs, like logging.jsonl: each step once
            for name in STEP_LOGS:
                truncate_log(self.out / name, start)
        writer = CheckpointWriter(self.out, cfg.save_total_limit)
        window: list[dict] = []
        t0 = time.time()
        last_saved = start
        with PreemptionGuard() as guard:  # also over the last save's wait in writer.close()
            try:
                for step in range(start + 1, self.total_steps + 1):
                    metrics = self.algo.run_step(self)
                    self._check_finite(step, metrics, last_saved)
                    window.append(metrics)
                    logger.advance(1, {k: metrics[k] for k in self.algo.progress_keys if k in metrics})
                    if step % cfg.logging_steps == 0 or step == self.total_steps:
                        logger.log(step, self._window_row(window, time.time() - t0))
                        window, t0 = [], time.time()
                    for hook in self.hooks:
                        if hook.due(step, self.total_steps):
                            row = hook.fn(self, step)
                            if row:
                                logger.log(step, row)
                    if step % cfg.save_steps == 0 or step == self.total_steps:
                        writer.save(step, self.state, self._meta(step))
                        last_saved = step
                    if guard.should_stop(step):
                        if window:  # the steps since the last logged row
                            logger.log(step, self._window_row(window, time.time() - t0))
                        if last_saved != step:
                            writer.save(step, self.state, self._meta(step))
                        writer.wait()  # synchronous: the checkpoint is complete before the process exits
                        raise Preempted(step, guard.signum, str(self.out / f"checkpoint-{step}"))
            finally:
                writer.close()
                logger.close(self.algo.curve_keys)
                self.history = logger.history
            if guard.signum is not None and not guard.multi_host:  # signalled after the last step: no export
                raise Preempted(self.total_steps, guard.signum, str(self.out / f"checkpoint-{self.total_steps}"))

    def _remove_run_files(self, before: set[str], existed: bool) -> None:
        """Remove the run files this run created (not those it found), unless a checkpoint exists."""
        if list_checkpoints(self.out):
            return
        for name in RUN_FILES:
            path = self.out / name
            if name in before or not path.exists():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not existed and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    # ----- the result -------------------------------------------------------------------
    def model(self) -> nnx.Module:
        """The trained module as it is now (shares the train state's arrays)."""
        return nnx.merge(self.graphdef, self.state.params, self.rest)

    def policy(self) -> nnx.Module:
        """The language model being trained (PPO's policy without its value model; RM's whole model)."""
        return self.algo.policy(self.model())

    def export(self) -> None:
        """The trained model as a Hugging Face folder in output_dir (what the algorithm saves beside it)."""
        self.algo.export(self)
