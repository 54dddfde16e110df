"""PPO with four models (TRL's PPOv2 as ms-swift runs it): policy, reference, reward, value.

One PPO update: sample responses for a batch of prompts, run the rollout forward (policy,
reference and value log-probs/values and the reward model's score) in chunks of
``local_rollout_forward_batch_size``, turn scores into KL-penalised per-token rewards and
GAE advantages, then take ``num_ppo_epochs`` passes over the rollout in
``num_mini_batches`` shuffled mini-batches; each mini-batch is one optimizer step over the
policy and the value model together (``gradient_accumulation_steps`` micro-batches inside).
``--max_steps`` counts PPO updates (rollouts), as TRL's ``global_step`` does.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.trainers.checkpoint import (
    CheckpointWriter,
    read_meta,
    resolve_resume,
    restore_state,
    run_meta,
    write_run_files,
)
from jaxalign.trainers.logging import MetricsLogger
from jaxalign.trainers.loop import TrainingDiverged, stack_micro_batches
from jaxalign.trainers.optim import build_optimizer
from jaxalign.trainers.ppo_step import PolicyAndValue, PPOUpdate, advantages_and_returns, rollout_forward
from jaxalign.trainers.step import (
    CompileCounter,
    accumulation_sharding,
    build_train_step,
    create_train_state,
    split_model,
    state_shardings,
)


def param_bytes(module) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


class PPOTrainer:
    """Online PPO from a policy, a reference, a frozen reward model and a trained value model."""

    task = "ppo"
    curve_keys = ("objective/scores", "objective/rlhf_reward", "objective/kl", "loss/value_avg")

    def __init__(self, cfg, policy, ref_policy, reward_model, value_model, tokenizer, data, mesh):
        self.cfg, self.tokenizer, self.data, self.mesh = cfg, tokenizer, data, mesh
        self.out = Path(cfg.output_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.model_config = policy.config
        self.stop_ids = _stop_ids(tokenizer, policy.config)
        models = PolicyAndValue(policy, value_model)
        models.remat = bool(cfg.gradient_checkpointing)
        self.memory = {
            "policy": param_bytes(policy), "ref_model": param_bytes(ref_policy),
            "reward_model": param_bytes(reward_model), "value_model": param_bytes(value_model),
        }
        self.graphdef, params, self.rest = split_model(models)
        self.ref_graphdef, self.ref_params = nnx.split(ref_policy)
        self.rm_graphdef, self.rm_params = nnx.split(reward_model)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        self.micro_batch = cfg.per_device_train_batch_size * dp
        self.accum = cfg.gradient_accumulation_steps or 1
        self.mini_batch = self.micro_batch * self.accum
        self.rollout_batch = self.mini_batch * cfg.num_mini_batches
        from jaxalign.data.batching import BatchIterator, make_buckets

        buckets = [int(b) for b in cfg.length_buckets.split(",")] if cfg.length_buckets else None
        self.buckets = make_buckets(cfg.max_length, buckets=buckets)
        self.batches = BatchIterator(data.train, self.rollout_batch, self.buckets, seed=cfg.data_seed, pad_id=self.pad_id)
        if cfg.max_steps and cfg.max_steps > 0:
            self.total_updates = int(cfg.max_steps)
        else:
            self.total_updates = max(1, int(math.ceil(cfg.num_train_epochs * len(self.batches))))
        self.total_steps = self.total_updates
        optimizer_steps = self.total_updates * cfg.num_ppo_epochs * cfg.num_mini_batches
        self.optimizer, self.schedule = build_optimizer(cfg, optimizer_steps)
        self.state = create_train_state(params, self.optimizer, mesh, cfg.seed)
        self.update = PPOUpdate(cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                                temperature=_train_temperature(cfg.temperature))
        self.counter = CompileCounter()
        self._step_fn = None
        self.rng = jax.random.key(cfg.seed + 1)
        self.generation = 0
        self.eval_rows = list(data.val[:16]) if data.val else list(data.train[:16])

    # ----- rollouts -----------------------------------------------------------------------
    def models(self) -> PolicyAndValue:
        return nnx.merge(self.graphdef, self.state.params, self.rest)

    def model(self):
        return self.models().policy

    def sample(self, prompt_ids, prompt_mask, *, greedy: bool = False):
        from jaxalign.rollout import generate

        cfg = self.cfg
        rng = jax.random.fold_in(self.rng, self.generation)
        self.generation += 1
        roll = generate(
            self.model(), prompt_ids, prompt_mask, max_new_tokens=cfg.max_completion_length,
            temperature=0.0 if greedy else cfg.temperature, top_k=max(cfg.top_k, 0), top_p=cfg.top_p,
            stop_token_ids=self.stop_ids, rng=rng, pad_token_id=self.pad_id, mesh=self.mesh,
        )
        return {k: np.array(getattr(roll, k)) for k in ("tokens", "mask", "lengths", "finished")}

    @functools.cached_property
    def _forward_fn(self):
        graphdef, ref_gd, rm_gd, rest = self.graphdef, self.ref_graphdef, self.rm_graphdef, self.rest
        temperature = self.update.temperature

        @functools.partial(jax.jit, static_argnums=(5,))
        def fwd(params, ref_params, rm_params, ids, mask, prompt_len):
            return rollout_forward(
                nnx.merge(graphdef, params, rest), nnx.merge(ref_gd, ref_params), nnx.merge(rm_gd, rm_params),
                ids, mask, prompt_len, temperature,
            )

        return fwd

    def rollout(self, prompt_batch) -> tuple[dict, dict]:
        """Sample, score and compute advantages: (arrays for the update, rollout metrics)."""
        cfg = self.cfg
        prompt_ids, prompt_mask = prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"]
        roll = self.sample(prompt_ids, prompt_mask)
        p = prompt_ids.shape[1]
        ids = np.concatenate([prompt_ids, roll["tokens"]], axis=1).astype(np.int32)
        attn = np.concatenate([prompt_mask, roll["mask"]], axis=1).astype(np.int32)
        chunk = min(cfg.local_rollout_forward_batch_size, ids.shape[0])
        outs = []
        for i in range(0, ids.shape[0], chunk):
            sl = slice(i, i + chunk)
            a, m = ids[sl], attn[sl]
            if a.shape[0] < chunk:  # keep one compiled shape
                pad = chunk - a.shape[0]
                a, m = np.concatenate([a, np.repeat(a[-1:], pad, 0)]), np.concatenate([m, np.repeat(m[-1:], pad, 0)])
            o = jax.device_get(self._forward_fn(self.state.params, self.ref_params, self.rm_params, a, m, p))
            outs.append([np.asarray(x)[: ids[sl].shape[0]] for x in o])
        logps, ref_logps, values, scores = (np.concatenate([o[k] for o in outs]) for k in range(4))
        rmask = roll["mask"].astype(np.float32)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~roll["finished"]).astype(np.float32)
        logps, ref_logps, values = logps * rmask, ref_logps * rmask, values * rmask
        rewards, adv, returns = advantages_and_returns(
            jnp.asarray(logps), jnp.asarray(ref_logps), jnp.asarray(values), jnp.asarray(scores), jnp.asarray(rmask),
            kl_coef=cfg.kl_coef, gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
        )
        kl = (logps - ref_logps) * rmask
        non_score = (-cfg.kl_coef * kl).sum(1)
        arrays = {
            "query_responses": ids, "attention_mask": attn, "response_mask": rmask,
            "logps": logps.astype(np.float32), "values": values.astype(np.float32),
            "advantages": np.asarray(adv, np.float32), "returns": np.asarray(returns, np.float32),
        }
        eos = np.isin(roll["tokens"], list(self.stop_ids)) & (rmask > 0)
        metrics = {
            "objective/kl": float(kl.sum(1).mean()),
            "objective/entropy": float((-logps).sum(1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((scores + non_score).mean()),
            "objective/scores": float(scores.mean()),
            "val/num_eos_tokens": float(eos.sum()),
        }
        return arrays, metrics

    # ----- the update ---------------------------------------------------------------------
    def train_step(self, batch):
        bsh = {k: accumulation_sharding(self.mesh, v.ndim) for k, v in batch.items()}
        if self._step_fn is None:
            fn = build_train_step(self.graphdef, self.rest, self.update.loss_fn, self.update.totals_fn,
                                  self.optimizer, self.schedule, counter=self.counter)
            sh = state_shardings(self.state)
            self._step_fn = jax.jit(fn, in_shardings=(sh, bsh, None), out_shardings=(sh, None), donate_argnums=(0,))
        self.state, metrics = self._step_fn(self.state, jax.device_put(batch, bsh), None)
        return metrics

    def ppo_epochs(self, arrays, update_index: int) -> list[dict]:
        cfg = self.cfg
        n = arrays["response_mask"].shape[0]
        rng = np.random.default_rng(cfg.seed + update_index)
        out = []
        for _ in range(cfg.num_ppo_epochs):
            order = rng.permutation(n)
            for j in range(cfg.num_mini_batches):
                idx = order[j * self.mini_batch : (j + 1) * self.mini_batch]
                micros = [{k: v[idx[i * self.micro_batch : (i + 1) * self.micro_batch]] for k, v in arrays.items()}
                          for i in range(self.accum)]
                m = jax.device_get(self.train_step(stack_micro_batches(micros, self.pad_id)))
                out.append({k: float(v) for k, v in m.items()})
        return out

    def sample_generations(self, step: int, file) -> float:
        """Greedy responses to fixed evaluation prompts with their reward-model scores."""
        from jaxalign.data.collate import collate_prompt

        # the sampler shards rows over data*fsdp: repeat the last prompt up to a multiple, drop the copies after
        n = len(self.eval_rows)
        rows = self.eval_rows + self.eval_rows[-1:] * (-n % (self.mesh.shape["data"] * self.mesh.shape["fsdp"]))
        batch = collate_prompt(rows, max(ex.length for ex in rows), self.pad_id)
        roll = self.sample(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True)
        p = batch["prompt_input_ids"].shape[1]
        ids = np.concatenate([batch["prompt_input_ids"], roll["tokens"]], axis=1).astype(np.int32)
        attn = np.concatenate([batch["prompt_attention_mask"], roll["mask"]], axis=1).astype(np.int32)
        scores = np.asarray(self._score_fn(self.rm_params, ids, attn))[:n]
        for i in range(n):
            file.write(json.dumps({
                "step": step,
                "prompt": self.tokenizer.decode(ids[i, :p][attn[i, :p] > 0].tolist()),
                "response": self.tokenizer.decode(roll["tokens"][i, : roll["lengths"][i]].tolist(), skip_special_tokens=True),
                "score": float(scores[i]),
            }) + "\n")
        file.flush()
        return float(scores.mean())

    @functools.cached_property
    def _score_fn(self):
        """Reward-model scores of full sequences, compiled once (a fresh jit per call would recompile)."""
        rm_graphdef = self.rm_graphdef
        return jax.jit(lambda rm_params, ids, mask: nnx.merge(rm_graphdef, rm_params).scores(ids, mask))

    def _meta(self, step):
        return run_meta(step, self.batches, self.cfg, self.model_config, "ppo", generation=self.generation)

    def train(self) -> list[dict]:
        cfg = self.cfg
        write_run_files(self.out, self.tokenizer, cfg)
        if jax.process_index() == 0:
            print("jaxalign: parameter memory (MiB) " + json.dumps({k: round(v / 2**20, 2) for k, v in self.memory.items()}))
        step = 0
        if cfg.resume_from_checkpoint:
            path = resolve_resume(cfg.resume_from_checkpoint, self.out)
            meta = read_meta(path)
            self.state = restore_state(path, self.state)
            self.batches.restore(meta["data_state"])
            self.generation, step = int(meta["generation"]), int(meta["step"])
        logger = MetricsLogger(self.out, self.total_updates, report_to=cfg.report_to, initial_step=step)
        writer = CheckpointWriter(self.out, cfg.save_total_limit)
        samples = open(self.out / "samples.jsonl", "a")
        every = max(self.total_updates // max(cfg.num_sample_generations, 1), 1) if cfg.num_sample_generations else 0
        try:
            while step < self.total_updates:
                t0 = time.time()
                arrays, metrics = self.rollout(next(self.batches))
                t1 = time.time()
                per_step = self.ppo_epochs(arrays, step)
                step += 1
                row = {k: float(np.mean([m[k] for m in per_step])) for k in per_step[0] if k != "learning_rate"}
                if not math.isfinite(row["loss"]):
                    raise TrainingDiverged(f"step {step}: loss is {row['loss']}; stopped without saving; lower --learning_rate")
                ratios = [m["val/ratio"] for m in per_step]
                row.update(metrics)
                row["val/ratio_var"] = float(np.var(ratios))
                row["lr"] = per_step[-1]["learning_rate"]
                row["episode"] = step * self.rollout_batch
                row["time/rollout_s"], row["time/update_s"] = round(t1 - t0, 4), round(time.time() - t1, 4)
                row["compilations"] = self.counter.count
                logger.advance(1, {"score": metrics["objective/scores"]})
                if every and (step % every == 0 or step == 1):
                    row["eval/scores"] = self.sample_generations(step, samples)
                if step % cfg.logging_steps == 0 or step == self.total_updates or "eval/scores" in row:
                    logger.log(step, row)
                if step % cfg.save_steps == 0 or step == self.total_updates:
                    writer.save(step, self.state, self._meta(step))
        finally:
            samples.close()
            writer.close()
            logger.close(self.curve_keys)
        return logger.history

    def export(self) -> None:
        """The policy as a Hugging Face folder in output_dir; the value model in output_dir/value_model."""
        from jaxalign.convert import save_hf_model
        from jaxalign.convert.value_head_io import save_reward_model

        models = self.models()
        save_hf_model(models.policy, self.out, tokenizer=self.tokenizer, overwrite=True)
        save_reward_model(models.value, self.out / "value_model", tokenizer=self.tokenizer, overwrite=True)


def _train_temperature(t: float) -> float:
    # TRL divides logits by (temperature + 1e-7); greedy sampling keeps temperature-1 log-probs.
    return t + 1e-7 if t > 0 else 1.0


def _stop_ids(tokenizer, config) -> tuple[int, ...]:
    from jaxalign.rollout.generate import default_stop_token_ids

    ids = list(default_stop_token_ids(config))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(ids) or (-1,)
