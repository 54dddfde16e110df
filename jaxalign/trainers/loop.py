"""The training loop every offline algorithm shares: batches, compiled steps, eval, logs, checkpoints.

An algorithm object provides ``task`` (the data task, e.g. "sft" or "dpo"), ``loss_fn``,
``totals_fn``, ``extra`` (frozen arrays the step needs, such as reference params, or None),
``curve_keys`` and optionally ``setup(trainer)`` (e.g. to precompute reference log-probs).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np

from jaxalign.data.batching import BatchIterator, make_buckets
from jaxalign.errors import ConfigError, JaxalignError
from jaxalign.trainers.checkpoint import (
    CheckpointWriter,
    read_meta,
    resolve_resume,
    restore_state,
    run_meta,
    write_run_files,
)
from jaxalign.trainers.logging import MetricsLogger
from jaxalign.trainers.optim import build_optimizer
from jaxalign.trainers.step import (
    CompileCounter,
    accumulation_sharding,
    build_eval_step,
    build_train_step,
    create_train_state,
    split_model,
    state_shardings,
)


class TrainingDiverged(JaxalignError):
    """The loss became NaN or infinite."""


def stack_micro_batches(batches: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """[A] batches of possibly different bucket lengths -> arrays [A, B, ...] padded to the longest."""
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


class Trainer:
    """Runs one offline algorithm from a loaded model and prepared data to checkpoints and an export."""

    def __init__(self, cfg, algorithm, model, tokenizer, data, mesh):
        self.cfg = cfg
        self.algo = algorithm
        self.tokenizer = tokenizer
        self.data = data
        self.mesh = mesh
        self.out = Path(cfg.output_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.model_config = model.config
        model.remat = bool(cfg.gradient_checkpointing)
        self.graphdef, params, self.rest = split_model(model)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        self.micro_batch = cfg.per_device_train_batch_size * dp
        self.eval_batch = cfg.per_device_eval_batch_size * dp
        self.accum = cfg.gradient_accumulation_steps or max(1, math.ceil(16 / self.micro_batch))
        buckets = [int(b) for b in cfg.length_buckets.split(",")] if cfg.length_buckets else None
        self.buckets = make_buckets(cfg.max_length, buckets=buckets)
        self.batches = BatchIterator(data.train, self.micro_batch, self.buckets, seed=cfg.data_seed, pad_id=self.pad_id)
        per_epoch = len(self.batches) // self.accum
        if cfg.max_steps and cfg.max_steps > 0:
            self.total_steps = int(cfg.max_steps)
        else:
            if per_epoch == 0:
                raise ConfigError(
                    f"{len(self.batches)} micro-batches per epoch cannot fill one step of {self.accum}; "
                    "lower --gradient_accumulation_steps or --per_device_train_batch_size, or add data"
                )
            self.total_steps = max(1, int(math.ceil(cfg.num_train_epochs * per_epoch)))
        self.optimizer, self.schedule = build_optimizer(cfg, self.total_steps)
        self.state = create_train_state(params, self.optimizer, mesh, cfg.seed)
        self.counter = CompileCounter()
        self.eval_counter = CompileCounter()
        self._step_fn = None
        self._eval_fn = None
        if hasattr(algorithm, "setup"):
            algorithm.setup(self)

    # ----- compiled functions -------------------------------------------------------------
    def _batch_shardings(self, batch: dict):
        return {k: accumulation_sharding(self.mesh, v.ndim) for k, v in batch.items()}

    def _extra_shardings(self, extra):
        return jax.tree.map(lambda x: x.sharding, extra)

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a stacked [A, B, ...] numpy batch; returns device metrics."""
        extra = self.algo.extra()
        if self._step_fn is None:
            fn = build_train_step(
                self.graphdef, self.rest, self.algo.loss_fn, self.algo.totals_fn, self.optimizer, self.schedule,
                counter=self.counter,
            )
            sh = state_shardings(self.state)
            self._step_fn = jax.jit(
                fn,
                in_shardings=(sh, self._batch_shardings(batch), self._extra_shardings(extra)),
                out_shardings=(sh, None),
                donate_argnums=(0,),
            )
        device_batch = jax.device_put(batch, self._batch_shardings(batch))
        self.state, metrics = self._step_fn(self.state, device_batch, extra)
        return metrics

    def eval_metrics(self) -> dict[str, float]:
        """Mean metrics over the validation set (full batches only), prefixed ``eval_``."""
        if not self.data.val:
            return {}
        it = BatchIterator(self.data.val, self.eval_batch, self.buckets, seed=0, pad_id=self.pad_id, drop_last=False)
        extra = self.algo.extra()
        if self._eval_fn is None:
            fn = build_eval_step(self.graphdef, self.rest, self.algo.loss_fn, self.algo.totals_fn)

            def counted(params, batch, extra):
                self.eval_counter.tick()
                return fn(params, batch, extra)

            self._eval_fn = jax.jit(counted)
        sums: dict[str, float] = {}
        n = 0
        for idx in it.epoch_plan(0):
            if len(idx) != self.eval_batch:
                continue
            batch = stack_micro_batches([it.make_batch(idx)], self.pad_id)
            device_batch = jax.device_put(batch, self._batch_shardings(batch))
            m = jax.device_get(self._eval_fn(self.state.params, device_batch, extra))
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
        return int(meta["step"])

    def _meta(self, step: int) -> dict:
        return run_meta(step, self.batches, self.cfg, self.model_config, self.algo.task)

    def _next_step_batch(self) -> dict:
        return stack_micro_batches([next(self.batches) for _ in range(self.accum)], self.pad_id)

    def train(self) -> list[dict]:
        cfg = self.cfg
        write_run_files(self.out, self.tokenizer, cfg)
        start = self.resume(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else 0
        logger = MetricsLogger(self.out, self.total_steps, report_to=cfg.report_to, initial_step=start)
        writer = CheckpointWriter(self.out, cfg.save_total_limit)
        eval_every = cfg.eval_steps or cfg.save_steps
        window: list[dict] = []
        tokens = 0
        t0 = time.time()
        last_saved = start
        try:
            for step in range(start + 1, self.total_steps + 1):
                batch = self._next_step_batch()
                tokens += sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
                metrics = jax.device_get(self.train_step(batch))
                if hasattr(self.algo, "after_step"):
                    self.algo.after_step(metrics)
                loss = float(metrics["loss"])
                # A non-finite gradient norm means this step's update already poisoned the params.
                grad_norm = float(metrics.get("grad_norm", 0.0))
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise TrainingDiverged(
                        f"step {step}: loss is {loss}, grad_norm is {grad_norm}; stopped without saving (last good checkpoint: "
                        f"{'checkpoint-' + str(last_saved) if last_saved else 'none'}); lower --learning_rate"
                    )
                window.append({k: float(v) for k, v in metrics.items()})
                logger.advance(1, {"loss": loss})
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    dt = time.time() - t0
                    row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    row.update(
                        learning_rate=float(metrics["learning_rate"]),
                        epoch=round(self.batches.epoch + self.batches.position / max(len(self.batches), 1), 4),
                        tokens_per_second=round(tokens / dt, 2) if dt > 0 else 0.0,
                        seconds_per_step=round(dt / len(window), 4),
                        compilations=self.counter.count,
                    )
                    logger.log(step, row)
                    window, tokens, t0 = [], 0, time.time()
                if self.data.val and (step % eval_every == 0 or step == self.total_steps):
                    logger.log(step, self.eval_metrics())
                if step % cfg.save_steps == 0 or step == self.total_steps:
                    writer.save(step, self.state, self._meta(step))
                    last_saved = step
        finally:
            writer.close()
            logger.close(self.algo.curve_keys)
        return logger.history

    def model(self):
        """The current policy as an nnx module (shares the train state's arrays)."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.state.params, self.rest)
