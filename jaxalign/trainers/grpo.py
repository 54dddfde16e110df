"""GRPO (and its DAPO, Dr. GRPO and GSPO variants) for the one Trainer: sample groups, score them, update.

Each generation: take prompts, sample ``num_generations`` completions per prompt with the
sampler (one compiled call), score them with the reward functions on the host, compute
group advantages, cut the completions to the bucket of the longest one and the prompts' left padding to the
bucket of the longest prompt, lay each prompt out once with k of its completions (``--shared_prefix``, see
:mod:`jaxalign.trainers.shared_prefix`), and take ``num_iterations`` passes over the generation in micro-batches,
``gradient_accumulation_steps`` micro-batches per optimizer step. Every shape is fixed by (prompt bucket, completion bucket), so the update compiles at most once per
pair.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import ConfigError
from jaxalign.losses import gdpo_advantages, group_advantages
from jaxalign.parallel.distributed import say
from jaxalign.rewards import build_reward_funcs, split_names
from jaxalign.rewards.host_scoring import score_on_hosts
from jaxalign.rewards.model_reward import RewardModelReward
from jaxalign.trainers import shared_prefix
from jaxalign.trainers.algorithm import RolloutAlgorithm
from jaxalign.trainers.grpo_step import GRPOUpdate


def update_arrays(prompt_ids, prompt_mask, roll: dict, advantages, *, num_generations: int,
                  overlong_filter: bool, pack: int = 1) -> dict[str, np.ndarray]:
    """The update's arrays for one generation (see :mod:`jaxalign.trainers.grpo_step`): each prompt
    [P, P_len] repeated for its ``num_generations`` completions, followed by them; with ``pack`` k > 1
    (``--shared_prefix``), each prompt once followed by k of its completions, [N / k, P_len + k C]."""
    prompt_ids = np.repeat(prompt_ids, num_generations, axis=0)
    prompt_mask = np.repeat(prompt_mask, num_generations, axis=0)
    comp_mask = roll["mask"].astype(np.float32)
    if overlong_filter:
        comp_mask = comp_mask * roll["finished"].astype(np.float32)[:, None]
    if num_generations % pack:
        raise ValueError(f"{pack} completions to a row do not divide a group of {num_generations}")
    ids, mask = shared_prefix.pack_rows(prompt_ids, prompt_mask, roll["tokens"], roll["mask"], pack)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": comp_mask,
        "old_logps": roll["logps"].astype(np.float32),
        "advantages": np.asarray(advantages, np.float32),
    }


class GRPO(RolloutAlgorithm):
    """``--rlhf_type grpo``: the reference (while ``--beta`` > 0) is the starting model."""

    name = "grpo"
    curve_keys = ("reward", "loss", "kl", "completions/mean_length")
    progress_keys = ("loss", "reward")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.G = cfg.num_generations
        self.reward_funcs, self.reward_weights = [], []
        self.queue: list[list[dict]] = []  # the current generation's optimizer steps, as micro-batch lists
        self.generation_metrics: dict[str, float] = {}

    # ----- set-up -------------------------------------------------------------------------
    def prepare_model(self, model, mesh, tokenizer):
        """Load ``--ref_model`` (while ``--beta`` > 0) and build the reward functions (a reward model among
        them) before training starts."""
        cfg = self.cfg
        if cfg.beta > 0:
            model = super().prepare_model(model, mesh, tokenizer)
        self.reward_funcs = build_reward_funcs(split_names(cfg.reward_funcs), {k: cfg[k] for k in cfg.keys()},
                                               split_names(cfg.external_plugins))
        if cfg.reward_model:
            self.reward_funcs.append(RewardModelReward.from_path(cfg.reward_model, tokenizer, mesh=mesh,
                                                                 vocab_size=model.config.vocab_size))
        self.reward_weights = [float(w) for w in split_names(cfg.reward_weights)] or [1.0] * len(self.reward_funcs)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                              "reward functions; give one each")
        return model

    def rows_per_batch(self, trainer) -> int:
        """Prompts per generation, after checking the generation batch splits into groups and devices."""
        cfg = self.cfg
        self.steps_per_generation = cfg.steps_per_generation or trainer.accum
        if self.steps_per_generation % trainer.accum:
            raise ConfigError(f"--steps_per_generation {self.steps_per_generation} must be a multiple of "
                              f"--gradient_accumulation_steps {trainer.accum}")
        self.generation_batch = trainer.micro_batch * self.steps_per_generation
        if self.generation_batch % self.G:
            raise ConfigError(
                f"the generation batch ({self.generation_batch} completions = per_device_train_batch_size x "
                f"data-parallel devices x steps_per_generation) is not divisible by --num_generations {self.G}; "
                "adjust one of them"
            )
        self.prompts_per_generation = self.generation_batch // self.G
        # completions that share their prompt's pass through the model (1: a sequence each)
        self.pack = (shared_prefix.pack_factor(self.G, cfg.per_device_train_batch_size) if cfg.shared_prefix else 1)
        if self.prompts_per_generation % trainer.data_parallel:
            raise ConfigError(
                f"{self.prompts_per_generation} prompts per generation do not divide over {trainer.data_parallel} "
                "data-parallel devices; raise --per_device_train_batch_size or --steps_per_generation"
            )
        return self.prompts_per_generation

    def total_steps(self, trainer) -> int:
        self.updates_per_generation = self.cfg.num_iterations * self.steps_per_generation // trainer.accum
        return self.steps_for(len(trainer.batches) * self.updates_per_generation)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        cfg = trainer.cfg
        self.update = GRPOUpdate(
            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            loss_type=cfg.loss_type or "grpo", importance_sampling_level=cfg.importance_sampling_level,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
            tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, graphdef=trainer.graphdef, rest=trainer.rest,
        )
        if cfg.beta > 0:
            self.freeze_start_as_reference(trainer)
        if self.update.loss_type == "cispo" and cfg.epsilon_high is None:
            say(f"jaxalign: note: --loss_type cispo caps the importance ratio at --epsilon_high, which defaults to "
                f"--epsilon ({cfg.epsilon}) as in TRL and ms-swift; ScaleRL uses --epsilon_high 5")

    # ----- the loss (delegated to the update) ---------------------------------------------
    def loss_fn(self, model, micro, totals, extra, rng):
        return self.update.loss_fn(model, micro, totals, extra, rng)

    def totals_fn(self, batch):
        return self.update.totals_fn(batch)

    # ----- one logged step ----------------------------------------------------------------
    def run_step(self, trainer) -> dict[str, float]:
        """One optimizer step; a new generation first when the last one's steps are used up."""
        t0 = time.time()
        if not self.queue:
            arrays, self.generation_metrics, samples = self.generation_batch_arrays(trainer, next(trainer.batches))
            micros = self.micro_batches(trainer, arrays)
            steps = [micros[j : j + trainer.accum] for j in range(0, len(micros), trainer.accum)]
            self.queue = steps * self.cfg.num_iterations
            if self.cfg.log_completions and trainer.main_process:
                with open(trainer.out / "completions.jsonl", "a") as f:
                    first_step = int(jax.device_get(trainer.state.step)) + 1  # the first step trained on them
                    for s_ in samples:
                        f.write(json.dumps({"step": first_step, "generation": self.generation, **s_}) + "\n")
        t1 = time.time()
        metrics = trainer.step_on(self.queue.pop(0))
        return {**metrics, **self.generation_metrics, "time/update_s": round(time.time() - t1, 4),
                "time/step_s": round(time.time() - t0, 4)}

    def micro_batches(self, trainer, arrays: dict) -> list[dict]:
        """``steps_per_generation`` micro-batches, each an equal share of every array's rows (the packed rows of
        the shared-prefix layout are fewer than the completions)."""
        parts = self.steps_per_generation
        return [{k: v[i * (len(v) // parts) : (i + 1) * (len(v) // parts)] for k, v in arrays.items()}
                for i in range(parts)]

    # ----- rollouts -----------------------------------------------------------------------
    def sample_group(self, trainer, prompt_batch):
        """``num_generations`` completions per prompt: (rollout arrays, completion texts)."""
        roll = self.sample(trainer, prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"], n=self.G)
        tokens, lengths = roll["tokens"], roll["lengths"]
        texts = [trainer.tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
                 for i in range(tokens.shape[0])]
        return roll, texts

    def score(self, trainer, texts, extras, roll, prompt_ids, prompt_mask):
        """Every completion's rewards, on every host; with per-host prompt batches each host calls the Python
        reward functions on its own prompts' completions (the rows whose ``extras`` it holds)."""
        columns: dict[str, list] = {}
        known = next((e for e in extras if e is not None), {})
        for key in known:
            columns[key] = [None if e is None else e.get(key) for e in extras for _ in range(self.G)]
        tokens, lengths = roll["tokens"], roll["lengths"]
        columns["completion_ids"] = [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])]
        columns["prompt_ids"] = [
            prompt_ids[i // self.G][prompt_mask[i // self.G] > 0].tolist() for i in range(tokens.shape[0])
        ]
        span = trainer.batches.host_rows
        share = None if span is None else (span[0] * self.G, span[1] * self.G)
        return score_on_hosts(self.reward_funcs, self.reward_weights, texts, columns, share=share)

    def generation_batch_arrays(self, trainer, prompt_batch):
        """One generation with (optional) DAPO dynamic sampling: arrays for the update and metrics."""
        cfg = self.cfg
        t0 = time.time()
        prompt_batch = self.whole_prompt_batch(trainer, prompt_batch)
        roll, texts = self.sample_group(trainer, prompt_batch)
        total, per_func = self.score(trainer, texts, prompt_batch["extras"], roll, prompt_batch["prompt_input_ids"],
                                     prompt_batch["prompt_attention_mask"])
        groups = total.reshape(-1, self.G)
        if cfg.dynamic_sample:
            for _ in range(cfg.max_resample_times):
                flat = np.std(groups, axis=1) == 0
                if not flat.any():
                    break
                extra_batch = self.whole_prompt_batch(trainer, next(trainer.batches))
                if extra_batch["prompt_input_ids"].shape != prompt_batch["prompt_input_ids"].shape:
                    break
                roll2, texts2 = self.sample_group(trainer, extra_batch)
                total2, per2 = self.score(trainer, texts2, extra_batch["extras"], roll2, extra_batch["prompt_input_ids"],
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
        roll = self.cut_completions(roll)
        if cfg.scale_rewards == "gdpo":
            per_column = np.stack([per_func[name] for name in per_func], axis=1)
            adv = np.asarray(gdpo_advantages(jnp.asarray(per_column), self.reward_weights, num_generations=self.G))
        else:
            adv = np.asarray(group_advantages(jnp.asarray(total), num_generations=self.G,
                                              scale_rewards=cfg.scale_rewards))
        prompt_ids, prompt_mask = self.cut_prompts(prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"])
        arrays = update_arrays(prompt_ids, prompt_mask, roll, adv, num_generations=self.G,
                               overlong_filter=cfg.overlong_filter, pack=self.pack)
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
            {"prompt": trainer.tokenizer.decode(prompt_batch["prompt_input_ids"][i // self.G][
                prompt_batch["prompt_attention_mask"][i // self.G] > 0].tolist(), skip_special_tokens=False),
             "completion": texts[i], "reward": float(total[i]), "advantage": float(adv[i]),
             **{name: float(v[i]) for name, v in per_func.items()}}
            for i in range(len(texts))
        ]
        return arrays, metrics, samples
