"""PPO for the one Trainer, with four models (TRL's PPOv2 as ms-swift runs it): policy, reference, reward, value.

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
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.convert import load_any_model, save_hf_model
from jaxalign.convert.reward_model import head_files, load_reward_model, save_reward_model_folder
from jaxalign.data.collate import collate_prompt
from jaxalign.errors import ConfigError
from jaxalign.models.decoder import set_attn_impl
from jaxalign.parallel.activations import mesh_context
from jaxalign.parallel.distributed import host_array
from jaxalign.trainers.algorithm import RolloutAlgorithm
from jaxalign.trainers.tuner import export_adapter
from jaxalign.trainers.ppo_step import PolicyAndValue, PPOUpdate, advantages_and_returns, rollout_forward


def param_bytes(module) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def update_arrays(ids, attn, response_mask, logps, values, advantages, returns) -> dict[str, np.ndarray]:
    """The update's arrays for one rollout (see :mod:`jaxalign.trainers.ppo_step`): prompt+response
    sequences [R, P+C] and per-response-token [R, C] log-probs, values, advantages and returns."""
    return {
        "query_responses": np.asarray(ids, np.int32), "attention_mask": np.asarray(attn, np.int32),
        "response_mask": np.asarray(response_mask, np.float32), "logps": np.asarray(logps, np.float32),
        "values": np.asarray(values, np.float32), "advantages": np.asarray(advantages, np.float32),
        "returns": np.asarray(returns, np.float32),
    }


class PPO(RolloutAlgorithm):
    """``--rlhf_type ppo``: policy and value model trained together; reference and reward model frozen."""

    name = "ppo"
    curve_keys = ("objective/scores", "objective/rlhf_reward", "objective/kl", "loss/value_avg")
    progress_keys = ("objective/scores",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.updates_done = 0
        self._clock = None  # (time, updates done) when this process's first step began: for ``eps``

    # ----- set-up -------------------------------------------------------------------------
    def prepare_model(self, policy, mesh, tokenizer) -> PolicyAndValue:
        """Load the reference, reward and value models beside the policy; train policy + value."""
        cfg = self.cfg
        lora = cfg.get("tuner_type") == "lora"  # then the reference is the policy with its adapters off
        ref = None if lora else load_any_model(cfg.ref_model or cfg.model, dtype=cfg.torch_dtype, mesh=mesh)
        reward = load_reward_model(cfg.reward_model, dtype=cfg.torch_dtype, mesh=mesh, what="--reward_model ")
        value = load_reward_model(cfg.value_model or cfg.reward_model, dtype=cfg.torch_dtype, mesh=mesh,
                                  what="--value_model " if cfg.value_model else "--reward_model ")
        for name, m in (("--reward_model", reward), ("--value_model", value), ("--ref_model", ref or policy)):
            if m.config.vocab_size != policy.config.vocab_size:
                raise ConfigError(
                    f"{name}: vocabulary of {m.config.vocab_size} tokens differs from the policy's "
                    f"{policy.config.vocab_size}; PPO needs models that share the tokenizer"
                )
        self.memory = {"policy": param_bytes(policy), "ref_model": param_bytes(ref) if ref is not None else 0,
                       "reward_model": param_bytes(reward), "value_model": param_bytes(value)}
        for m in (ref, reward):  # split here, before the trainer sets the policy's attention
            if m is not None:
                set_attn_impl(m, cfg.get("attn_impl") or "auto")
        self.ref_graphdef, self.ref_params_frozen = nnx.split(ref) if ref is not None else (None, None)
        self.rm_graphdef, self.rm_params = nnx.split(reward)
        return PolicyAndValue(policy, value)

    def policy(self, module: PolicyAndValue):
        return module.policy

    def rows_per_batch(self, trainer) -> int:
        self.mini_batch = trainer.micro_batch * trainer.accum
        self.rollout_batch = self.mini_batch * self.cfg.num_mini_batches
        return self.rollout_batch

    def total_steps(self, trainer) -> int:
        return self.steps_for(len(trainer.batches))

    def optimizer_steps(self, total_steps: int) -> int:
        return total_steps * self.cfg.num_ppo_epochs * self.cfg.num_mini_batches

    def setup(self, trainer) -> None:
        super().setup(trainer)
        cfg = self.cfg
        self.graphdef, self.rest = trainer.graphdef, trainer.rest
        if self.ref_graphdef is None:  # LoRA: the policy with its adapters off (or --ref_adapters)
            self.freeze_start_as_reference(trainer)
            self.ref_params_frozen = self.ref_params
        self.update = PPOUpdate(cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                                temperature=_train_temperature(cfg.temperature))
        self.eval_rows = list(trainer.data.val[:16]) if trainer.data.val else list(trainer.data.train[:16])
        if trainer.main_process:
            print("jaxalign: parameter memory (MiB) " + json.dumps({k: round(v / 2**20, 2) for k, v in self.memory.items()}))
        if cfg.num_sample_generations:
            every = max(trainer.total_steps // max(cfg.num_sample_generations, 1), 1)
            trainer.add_hook(lambda tr, step: {"eval/scores": self.sample_generations(tr, step)}, every=every,
                             at_end=False, at_start=True)

    def loss_fn(self, model, micro, totals, extra, rng):
        return self.update.loss_fn(model, micro, totals, extra, rng)

    def totals_fn(self, batch):
        return self.update.totals_fn(batch)

    def extra(self):
        return None

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.updates_done = int(state.get("step", 0))

    def export(self, trainer) -> None:
        """The policy as a Hugging Face folder in output_dir; the value model in output_dir/value_model."""
        models = trainer.model()
        if self.lora is not None:  # each model's adapter in PEFT's format; the value head trained fully beside it
            cfg = self.cfg
            export_adapter(self, trainer, models.policy, trainer.out, base_model=cfg.model)
            export_adapter(self, trainer, models.value.backbone, trainer.out / "value_model",
                           base_model=cfg.value_model or cfg.reward_model,
                           extra_files=head_files(models.value))
            return
        save_hf_model(models.policy, trainer.out, tokenizer=trainer.tokenizer, overwrite=True)
        save_reward_model_folder(models.value, trainer.out / "value_model", tokenizer=trainer.tokenizer, overwrite=True)

    # ----- one logged step: a rollout and its PPO epochs ------------------------------------
    def run_step(self, trainer) -> dict[str, float]:
        t0 = time.time()
        step = int(self.updates_done)
        if self._clock is None:
            self._clock = (t0, step)
        arrays, metrics = self.rollout(trainer, next(trainer.batches))
        t1 = time.time()
        per_step = self.ppo_epochs(trainer, arrays, step)
        self.updates_done += 1
        row = {k: float(np.mean([m[k] for m in per_step])) for k in per_step[0] if k != "learning_rate"}
        row.update(metrics)
        row["val/ratio_var"] = float(np.var([m["val/ratio"] for m in per_step]))
        row["lr"] = per_step[-1]["learning_rate"]
        row["episode"] = (step + 1) * self.rollout_batch
        # TRL's episodes per second (an int, as TRL logs it), over this process's steps: a resumed run is not
        # credited with the episodes before it
        start, first = self._clock
        row["eps"] = int((step + 1 - first) * self.rollout_batch / max(time.time() - start, 1e-9))
        row["time/rollout_s"], row["time/update_s"] = round(t1 - t0, 4), round(time.time() - t1, 4)
        return row

    @functools.cached_property
    def rollout_forward_fn(self):
        graphdef, ref_gd, rm_gd, rest = self.graphdef, self.ref_graphdef, self.rm_graphdef, self.rest
        temperature = self.update.temperature

        @functools.partial(jax.jit, static_argnums=(5,))
        def fwd(params, ref_params, rm_params, ids, mask, prompt_len):
            if ref_gd is None:  # LoRA: trainable-shaped params with the adapters off, on the shared base
                ref = nnx.merge(graphdef, ref_params, rest).policy
            else:
                ref = nnx.merge(ref_gd, ref_params)
            return rollout_forward(
                nnx.merge(graphdef, params, rest), ref, nnx.merge(rm_gd, rm_params), ids, mask, prompt_len, temperature,
            )

        return fwd

    def rollout(self, trainer, prompt_batch) -> tuple[dict, dict]:
        """Sample, score and compute advantages: (arrays for the update, rollout metrics)."""
        cfg = self.cfg
        prompt_batch = self.whole_prompt_batch(trainer, prompt_batch)
        prompt_ids, prompt_mask = prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"]
        roll = self.cut_completions(self.sample(trainer, prompt_ids, prompt_mask))
        prompt_ids, prompt_mask = self.cut_prompts(prompt_ids, prompt_mask)
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
            with mesh_context(trainer.mesh):
                o = self.rollout_forward_fn(trainer.state.params, self.ref_params_frozen, self.rm_params, a, m, p)
            outs.append([host_array(x)[: ids[sl].shape[0]] for x in o])
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
        arrays = update_arrays(ids, attn, rmask, logps, values, adv, returns)
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

    def ppo_epochs(self, trainer, arrays, update_index: int) -> list[dict]:
        cfg = self.cfg
        n = arrays["response_mask"].shape[0]
        rng = np.random.default_rng(cfg.seed + update_index)
        out = []
        for _ in range(cfg.num_ppo_epochs):
            order = rng.permutation(n)
            for j in range(cfg.num_mini_batches):
                idx = order[j * self.mini_batch : (j + 1) * self.mini_batch]
                mb = trainer.micro_batch  # not ``n``: the next epoch permutes all n rows again
                micros = [{k: v[idx[i * mb : (i + 1) * mb]] for k, v in arrays.items()} for i in range(trainer.accum)]
                out.append(trainer.step_on(micros))
        return out

    def sample_generations(self, trainer, step: int) -> float:
        """Greedy responses to fixed evaluation prompts with their reward-model scores."""
        # the sampler shards rows over data*fsdp: repeat the last prompt up to a multiple, drop the copies after
        n = len(self.eval_rows)
        rows = self.eval_rows + self.eval_rows[-1:] * (-n % trainer.data_parallel)
        batch = collate_prompt(rows, max(ex.length for ex in rows), trainer.pad_id)
        roll = self.sample(trainer, batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True)
        p = batch["prompt_input_ids"].shape[1]
        ids = np.concatenate([batch["prompt_input_ids"], roll["tokens"]], axis=1).astype(np.int32)
        attn = np.concatenate([batch["prompt_attention_mask"], roll["mask"]], axis=1).astype(np.int32)
        with mesh_context(trainer.mesh):
            scores = host_array(self.score_fn(self.rm_params, ids, attn))[:n]
        rows_out = []
        for i in range(n):
            rows_out.append(json.dumps({
                "step": step,
                "prompt": trainer.tokenizer.decode(ids[i, :p][attn[i, :p] > 0].tolist()),
                "response": trainer.tokenizer.decode(roll["tokens"][i, : roll["lengths"][i]].tolist(), skip_special_tokens=True),
                "score": float(scores[i]),
            }) + "\n")
        if trainer.main_process:
            with open(trainer.out / "samples.jsonl", "a") as f:
                f.writelines(rows_out)
        return float(scores.mean())

    @functools.cached_property
    def score_fn(self):
        """Reward-model scores of full sequences, compiled once (a fresh jit per call would recompile)."""
        rm_graphdef = self.rm_graphdef
        return jax.jit(lambda rm_params, ids, mask: nnx.merge(rm_graphdef, rm_params).scores(ids, mask))


def _train_temperature(t: float) -> float:
    # TRL divides logits by (temperature + 1e-7); greedy sampling keeps temperature-1 log-probs.
    return t + 1e-7 if t > 0 else 1.0
