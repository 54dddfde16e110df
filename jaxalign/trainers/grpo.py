"""GRPO (and its DAPO, Dr. GRPO and GSPO variants): sample groups, score them, update.

Each generation: take prompts, sample ``num_generations`` completions per prompt with the
sampler (one compiled call), score them with the reward functions on the host, compute
group advantages, and take ``num_iterations`` passes over the generation in micro-batches,
``gradient_accumulation_steps`` micro-batches per optimizer step, through the shared compiled
step. Every shape is fixed by (prompt bucket, max_completion_length), so nothing recompiles
from one step to the next.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.config import DEFAULT_BETA
from jaxalign.errors import ConfigError
from jaxalign.losses import group_advantages
from jaxalign.trainers.checkpoint import (
    CheckpointWriter,
    read_meta,
    resolve_resume,
    restore_state,
    run_meta,
    write_run_files,
)
from jaxalign.trainers.grpo_step import GRPOUpdate
from jaxalign.trainers.logging import MetricsLogger
from jaxalign.trainers.loop import TrainingDiverged, stack_micro_batches
from jaxalign.trainers.optim import build_optimizer
from jaxalign.trainers.step import (
    CompileCounter,
    accumulation_sharding,
    build_train_step,
    create_train_state,
    split_model,
    state_shardings,
)


def split_names(value) -> list[str]:
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v for v in str(value).replace(",", " ").split() if v]


class GRPOTrainer:
    """Online GRPO from a policy model, prompt data and reward functions."""

    task = "grpo"
    curve_keys = ("reward", "loss", "kl", "completions/mean_length")

    def __init__(self, cfg, model, tokenizer, data, mesh, reward_funcs, reward_weights):
        self.cfg, self.tokenizer, self.data, self.mesh = cfg, tokenizer, data, mesh
        self.out = Path(cfg.output_dir)
        self.reward_funcs, self.reward_weights = reward_funcs, reward_weights
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.model_config = model.config
        from jaxalign.trainers.ppo import _stop_ids

        self.stop_ids = _stop_ids(tokenizer, model.config)
        model.remat = bool(cfg.gradient_checkpointing)
        self.graphdef, params, self.rest = split_model(model)
        self.G = cfg.num_generations
        if self.G < 2:
            raise ConfigError(f"--num_generations {self.G}: GRPO needs at least 2 completions per prompt")
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        self.micro_batch = cfg.per_device_train_batch_size * dp
        self.accum = cfg.gradient_accumulation_steps or 1
        self.steps_per_generation = cfg.steps_per_generation or self.accum
        if self.steps_per_generation % self.accum:
            raise ConfigError(
                f"--steps_per_generation {self.steps_per_generation} must be a multiple of "
                f"--gradient_accumulation_steps {self.accum}"
            )
        self.generation_batch = self.micro_batch * self.steps_per_generation
        if self.generation_batch % self.G:
            raise ConfigError(
                f"the generation batch ({self.generation_batch} completions = per_device_train_batch_size x "
                f"data-parallel devices x steps_per_generation) is not divisible by --num_generations {self.G}; "
                "adjust one of them"
            )
        self.prompts_per_generation = self.generation_batch // self.G
        if self.prompts_per_generation % dp:
            raise ConfigError(
                f"{self.prompts_per_generation} prompts per generation do not divide over {dp} data-parallel devices; "
                "raise --per_device_train_batch_size or --steps_per_generation"
            )
        from jaxalign.data.batching import BatchIterator, make_buckets

        buckets = [int(b) for b in cfg.length_buckets.split(",")] if cfg.length_buckets else None
        self.buckets = make_buckets(cfg.max_length, buckets=buckets)
        self.batches = BatchIterator(data.train, self.prompts_per_generation, self.buckets, seed=cfg.data_seed,
                                     pad_id=self.pad_id)
        self.updates_per_generation = cfg.num_iterations * self.steps_per_generation // self.accum
        if cfg.max_steps and cfg.max_steps > 0:
            self.total_steps = int(cfg.max_steps)
        else:
            gens = max(1, int(math.ceil(cfg.num_train_epochs * len(self.batches))))
            self.total_steps = gens * self.updates_per_generation
        self.optimizer, self.schedule = build_optimizer(cfg, self.total_steps)
        self.state = create_train_state(params, self.optimizer, mesh, cfg.seed)
        beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA["grpo"]
        self.update = GRPOUpdate(
            beta=beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            loss_type=cfg.loss_type or "grpo", importance_sampling_level=cfg.importance_sampling_level,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
            graphdef=self.graphdef, rest=self.rest,
            ref_params=jax.tree.map(jnp.copy, params) if beta > 0 else None,
        )
        self.counter = CompileCounter()
        self._step_fn = None
        self.rng = jax.random.key(cfg.seed + 1)
        self.generation = 0

    # ----- rollouts -----------------------------------------------------------------------
    def _policy(self):
        from flax import nnx

        return nnx.merge(self.graphdef, self.state.params, self.rest)

    def sample(self, prompt_batch):
        """Completions for a prompt batch: (train arrays, completion texts, extras, rollout info)."""
        from jaxalign.rollout import generate

        cfg = self.cfg
        rng = jax.random.fold_in(self.rng, self.generation)
        self.generation += 1
        roll = generate(
            self._policy(), prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"],
            max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
            top_k=max(cfg.top_k, 0), top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
            stop_token_ids=self.stop_ids, rng=rng, num_return_sequences=self.G, pad_token_id=self.pad_id,
            mesh=self.mesh,
        )
        roll = {name: np.array(getattr(roll, name)) for name in ("tokens", "logps", "mask", "lengths", "finished")}
        tokens, lengths = roll["tokens"], roll["lengths"]
        texts = [self.tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
                 for i in range(tokens.shape[0])]
        return roll, texts

    def score(self, texts, extras, roll, prompt_ids, prompt_mask):
        from jaxalign.rewards import score_completions

        columns: dict[str, list] = {}
        for key in extras[0] if extras else []:
            columns[key] = [e.get(key) for e in extras for _ in range(self.G)]
        tokens, lengths = roll["tokens"], roll["lengths"]
        columns["completion_ids"] = [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])]
        columns["prompt_ids"] = [
            prompt_ids[i // self.G][prompt_mask[i // self.G] > 0].tolist() for i in range(tokens.shape[0])
        ]
        return score_completions(self.reward_funcs, self.reward_weights, texts, columns)

    def generation_batch_arrays(self, prompt_batch):
        """One generation with (optional) DAPO dynamic sampling: arrays for the update and metrics."""
        cfg = self.cfg
        t0 = time.time()
        roll, texts = self.sample(prompt_batch)
        total, per_func = self.score(texts, prompt_batch["extras"], roll, prompt_batch["prompt_input_ids"],
                                     prompt_batch["prompt_attention_mask"])
        groups = total.reshape(-1, self.G)
        if cfg.dynamic_sample:
            for _ in range(cfg.max_resample_times):
                flat = np.std(groups, axis=1) == 0
                if not flat.any():
                    break
                extra_batch = next(self.batches)
                if extra_batch["prompt_input_ids"].shape != prompt_batch["prompt_input_ids"].shape:
                    break
                roll2, texts2 = self.sample(extra_batch)
                total2, per2 = self.score(texts2, extra_batch["extras"], roll2, extra_batch["prompt_input_ids"],
                                          extra_batch["prompt_attention_mask"])
                g2 = total2.reshape(-1, self.G)
                good = np.where(np.std(g2, axis=1) > 0)[0]
                # replace flat groups by informative groups from the resample, group by group
                for dst, src in zip(np.where(flat)[0], good):
                    rows_d, rows_s = slice(dst * self.G, (dst + 1) * self.G), slice(src * self.G, (src + 1) * self.G)
                    for name in ("tokens", "logps", "mask", "lengths", "finished"):
                        roll[name][rows_d] = roll2[name][rows_s]
                    texts[rows_d] = texts2[rows_s]
                    for k in per_func:
                        per_func[k][rows_d] = per2[k][rows_s]
                    total[rows_d] = total2[rows_s]
                    prompt_batch["prompt_input_ids"][dst] = extra_batch["prompt_input_ids"][src]
                    prompt_batch["prompt_attention_mask"][dst] = extra_batch["prompt_attention_mask"][src]
                    prompt_batch["extras"][dst] = extra_batch["extras"][src]
                groups = total.reshape(-1, self.G)
        gen_time = time.time() - t0
        adv = np.asarray(group_advantages(jnp.asarray(total), num_generations=self.G, scale_rewards=cfg.scale_rewards))
        prompt_ids = np.repeat(prompt_batch["prompt_input_ids"], self.G, axis=0)
        prompt_mask = np.repeat(prompt_batch["prompt_attention_mask"], self.G, axis=0)
        comp_mask = roll["mask"].astype(np.float32)
        if cfg.overlong_filter:
            comp_mask = comp_mask * roll["finished"].astype(np.float32)[:, None]
        arrays = {
            "input_ids": np.concatenate([prompt_ids, roll["tokens"]], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([prompt_mask, roll["mask"]], axis=1).astype(np.int32),
            "completion_mask": comp_mask,
            "old_logps": roll["logps"].astype(np.float32),
            "advantages": adv.astype(np.float32),
        }
        lengths = roll["lengths"]
        metrics = {
            "reward": float(np.mean(groups.mean(axis=1))),
            "reward_std": float(np.std(total, ddof=1)) if cfg.scale_rewards == "batch"
            else float(np.mean(np.std(groups, axis=1, ddof=1))),
            "frac_reward_zero_std": float(np.mean(np.std(groups, axis=1) == 0)),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(1.0 - roll["finished"].mean()),
            "time/generation_s": round(gen_time, 4),
        }
        for name, vals in per_func.items():
            metrics[f"rewards/{name}/mean"] = float(np.nanmean(vals))
            metrics[f"rewards/{name}/std"] = float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
        samples = [
            {"prompt": self.tokenizer.decode(prompt_batch["prompt_input_ids"][i // self.G][
                prompt_batch["prompt_attention_mask"][i // self.G] > 0].tolist(), skip_special_tokens=False),
             "completion": texts[i], "reward": float(total[i]), "advantage": float(adv[i]),
             **{name: float(v[i]) for name, v in per_func.items()}}
            for i in range(len(texts))
        ]
        return arrays, metrics, samples

    # ----- the update ---------------------------------------------------------------------
    def train_step(self, batch):
        if self._step_fn is None:
            fn = build_train_step(self.graphdef, self.rest, self.update.loss_fn, self.update.totals_fn,
                                  self.optimizer, self.schedule, counter=self.counter)
            sh = state_shardings(self.state)
            bsh = {k: accumulation_sharding(self.mesh, v.ndim) for k, v in batch.items()}
            esh = jax.tree.map(lambda x: x.sharding, self.update.extra())
            self._step_fn = jax.jit(fn, in_shardings=(sh, bsh, esh), out_shardings=(sh, None), donate_argnums=(0,))
        bsh = {k: accumulation_sharding(self.mesh, v.ndim) for k, v in batch.items()}
        self.state, metrics = self._step_fn(self.state, jax.device_put(batch, bsh), self.update.extra())
        return metrics

    def _micro_batches(self, arrays):
        n = self.micro_batch
        return [{k: v[i * n : (i + 1) * n] for k, v in arrays.items()} for i in range(self.steps_per_generation)]

    def _meta(self, step):
        return run_meta(step, self.batches, self.cfg, self.model_config, "grpo", generation=self.generation)

    def train(self) -> list[dict]:
        cfg = self.cfg
        write_run_files(self.out, self.tokenizer, cfg)
        step = 0
        if cfg.resume_from_checkpoint:
            path = resolve_resume(cfg.resume_from_checkpoint, self.out)
            meta = read_meta(path)
            self.state = restore_state(path, self.state)
            self.batches.restore(meta["data_state"])
            self.generation = int(meta["generation"])
            step = int(meta["step"])
        logger = MetricsLogger(self.out, self.total_steps, report_to=cfg.report_to, initial_step=step)
        writer = CheckpointWriter(self.out, cfg.save_total_limit)
        completions_file = open(self.out / "completions.jsonl", "a") if cfg.log_completions else None
        window: list[dict] = []
        try:
            while step < self.total_steps:
                prompt_batch = next(self.batches)
                arrays, gen_metrics, samples = self.generation_batch_arrays(prompt_batch)
                micros = self._micro_batches(arrays)
                t0 = time.time()
                for _ in range(cfg.num_iterations):
                    for j in range(0, len(micros), self.accum):
                        if step >= self.total_steps:
                            break
                        batch = stack_micro_batches(micros[j : j + self.accum], self.pad_id)
                        metrics = jax.device_get(self.train_step(batch))
                        step += 1
                        loss = float(metrics["loss"])
                        if not math.isfinite(loss):
                            raise TrainingDiverged(f"step {step}: loss is {loss}; stopped without saving; lower --learning_rate")
                        window.append({**{k: float(v) for k, v in metrics.items()}, **gen_metrics})
                        logger.advance(1, {"loss": loss, "reward": gen_metrics["reward"]})
                        if step % cfg.logging_steps == 0 or step == self.total_steps:
                            row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                            row["time/update_s"] = round((time.time() - t0), 4)
                            row["compilations"] = self.counter.count
                            logger.log(step, row)
                            window = []
                        if step % cfg.save_steps == 0 or step == self.total_steps:
                            writer.save(step, self.state, self._meta(step))
                if completions_file is not None:
                    for s_ in samples:
                        completions_file.write(json.dumps({"step": step, **s_}) + "\n")
                    completions_file.flush()
        finally:
            writer.close()
            logger.close(self.curve_keys)
            if completions_file is not None:
                completions_file.close()
        return logger.history

    def model(self):
        return self._policy()
