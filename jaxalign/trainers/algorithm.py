"""Defaults for the :class:`jaxalign.trainers.trainer.Algorithm` protocol, and its two families.

:class:`AlgorithmBase` holds what most algorithms share (no extra models, a plain export);
:class:`OfflineAlgorithm` adds what every dataset-driven one does (SFT, DPO and kin, KTO, RM):
each step stacks ``gradient_accumulation_steps`` micro-batches from the data, and evaluation on
``--val_dataset`` is a hook every ``--eval_steps``. :class:`RolloutAlgorithm` (GRPO, PPO) samples
its batches from the policy with the sampler, counting generations so a resumed run draws the same.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.algorithms import spec_of
from jaxalign.convert import load_any_model, save_hf_model
from jaxalign.data.batching import make_buckets, stack_micro_batches
from jaxalign.data.tokenizer import stop_token_ids
from jaxalign.errors import ConfigError
from jaxalign.parallel.distributed import count_over_hosts, host_array
from jaxalign.rollout import generate
from jaxalign.trainers.tuner import export_adapter, lora_reference


class AlgorithmBase:
    """Defaults: the policy is the trained module, exported as a Hugging Face folder."""

    name = "base"
    curve_keys: tuple[str, ...] = ("loss",)
    progress_keys: tuple[str, ...] = ("loss",)
    per_host_batches = False  # True: each host builds only its devices' rows of a data batch
    shares_prompts = False  # True: preference batches hold each prompt once (the shared-prefix layout)

    def __init__(self, cfg):
        self.cfg = cfg
        self.spec = spec_of(self.name)
        self.ref_params = None
        self.lora = None  # the LoRASettings under --tuner_type lora (set by trainers.tuner.apply_tuner)

    def prepare_model(self, model: nnx.Module, mesh, tokenizer) -> nnx.Module:
        """The module to train, built around the loaded model; loads ``--ref_model`` when the
        algorithm has a reference and one is given."""
        if self.spec.reference != "none" and self.cfg.get("ref_model"):
            ref = load_any_model(self.cfg.ref_model, dtype=self.cfg.torch_dtype, mesh=mesh)
            if ref.config.vocab_size != model.config.vocab_size:
                raise ConfigError(f"--ref_model {self.cfg.ref_model}: vocabulary {ref.config.vocab_size} differs from "
                                  f"the model's {model.config.vocab_size}")
            self.ref_params = nnx.state(ref, nnx.Param)
        return model

    def default_accumulation(self, micro_batch: int) -> int:
        return 1

    def steps_for(self, per_epoch: int) -> int:
        """``--max_steps``, else ``--num_train_epochs`` passes of ``per_epoch`` steps."""
        if self.cfg.max_steps and self.cfg.max_steps > 0:
            return int(self.cfg.max_steps)
        return max(1, int(math.ceil(self.cfg.num_train_epochs * per_epoch)))

    def optimizer_steps(self, total_steps: int) -> int:
        return total_steps

    def setup(self, trainer) -> None:
        pass

    def freeze_start_as_reference(self, trainer) -> None:
        """The starting params, copied and frozen, as the reference (unless ``--ref_model`` gave one); under
        LoRA the adapters switched off (or ``--ref_adapters``), with no second copy of the base."""
        if self.ref_params is None:
            if self.lora is not None:
                self.ref_params = lora_reference(self, trainer)
            else:
                self.ref_params = jax.tree.map(jnp.copy, trainer.state.params)

    def extra(self):
        return self.ref_params

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def policy(self, module: nnx.Module) -> nnx.Module:
        return module

    def export(self, trainer) -> None:
        """A Hugging Face folder in output_dir; under LoRA the adapter in PEFT's format."""
        if self.lora is not None:
            export_adapter(self, trainer, trainer.policy(), trainer.out, base_model=self.cfg.model)
            return
        save_hf_model(trainer.policy(), trainer.out, tokenizer=trainer.tokenizer, overwrite=True)


class OfflineAlgorithm(AlgorithmBase):
    """Trains on the dataset's rows: one optimizer step per ``gradient_accumulation_steps`` micro-batches, each
    host reading only the rows its devices train on."""

    per_host_batches = True

    def default_accumulation(self, micro_batch: int) -> int:
        # ms-swift: enough micro-batches for a total batch of at least 16 rows.
        return max(1, math.ceil(16 / micro_batch))

    def rows_per_batch(self, trainer) -> int:
        return trainer.micro_batch

    def total_steps(self, trainer) -> int:
        per_epoch = len(trainer.batches) // trainer.accum
        if per_epoch == 0 and not (self.cfg.max_steps and self.cfg.max_steps > 0):
            raise ConfigError(
                f"{len(trainer.batches)} micro-batches per epoch cannot fill one step of {trainer.accum}; "
                "lower --gradient_accumulation_steps or --per_device_train_batch_size, or add data"
            )
        return self.steps_for(per_epoch)

    def setup(self, trainer) -> None:
        if trainer.data.val:
            trainer.add_hook(lambda tr, step: tr.eval_metrics(), every=self.cfg.eval_steps or self.cfg.save_steps)

    def next_batch(self, trainer) -> list[dict]:
        """The next optimizer step's micro-batches from the data."""
        return [next(trainer.batches) for _ in range(trainer.accum)]

    def next_step_batch(self, trainer) -> dict:
        """The next optimizer step's micro-batches stacked into [A, B, ...] arrays (for ``train_step``)."""
        return stack_micro_batches(self.next_batch(trainer), trainer.pad_id)

    def run_step(self, trainer) -> dict[str, float]:
        micros = self.next_batch(trainer)
        metrics = trainer.step_on(micros)
        self.after_step(metrics)
        tokens = sum(int(v.sum()) for m in micros for k, v in m.items() if k.endswith("attention_mask"))
        if trainer.batches.host_rows is not None:  # this host's rows only
            tokens = count_over_hosts(tokens)
        return {**metrics, "num_tokens": float(tokens)}

    def after_step(self, metrics: dict[str, float]) -> None:
        pass


COMPLETION_BUCKET_MIN = 16


def completion_buckets(max_completion_length: int) -> list[int]:
    """Widths a rollout's completions (or its prompts, below their padded width) are cut to: powers of two from
    16 below the budget, then the budget (64 -> 16, 32, 64; 5 -> 5)."""
    return make_buckets(max_completion_length, min_length=min(COMPLETION_BUCKET_MIN, max_completion_length))


class RolloutAlgorithm(AlgorithmBase):
    """Learns from completions the policy samples: one sampler call per generation, each with its own
    random draw (``--seed`` and the generation count, which checkpoints carry). On several hosts each builds its
    devices' rows of each prompt batch, and :meth:`whole_prompt_batch` joins them."""

    per_host_batches = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.generation = 0
        self.rng = jax.random.key(cfg.seed + 1)

    def setup(self, trainer) -> None:
        self.stop_ids = stop_token_ids(trainer.tokenizer, trainer.model_config)

    def whole_prompt_batch(self, trainer, batch: dict) -> dict:
        """The whole prompt batch on every host from each host's rows (one all-gather of the prompt ids; the other
        hosts' ``extras`` are None here, their rows being scored there). Unchanged when the host built it all."""
        span = trainer.batches.host_rows
        if span is None:
            return batch
        rows = trainer.batches.batch_size
        ids, mask = (host_array(trainer.place_rows(batch[k], rows))
                     for k in ("prompt_input_ids", "prompt_attention_mask"))
        extras = [None] * rows
        extras[span[0] : span[1]] = batch["extras"]
        return {**batch, "prompt_input_ids": ids, "prompt_attention_mask": mask, "extras": extras}

    def sample(self, trainer, prompt_ids, prompt_mask, *, n: int = 1, greedy: bool = False) -> dict[str, np.ndarray]:
        """``n`` completions per prompt from the current policy: tokens, their log-probs, masks, lengths and
        whether each finished (host arrays)."""
        rng = jax.random.fold_in(self.rng, self.generation)
        self.generation += 1
        roll = generate(trainer.policy(), prompt_ids, prompt_mask, rng=rng, **self.sampling(trainer, n, greedy))
        return {name: host_array(getattr(roll, name)) for name in ("tokens", "logps", "mask", "lengths", "finished")}

    def cut_completions(self, roll: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rollout cut to the smallest completion bucket (:func:`completion_buckets`) holding its longest
        completion: scoring, log-probs and the update then run over that width, not the whole
        ``--max_completion_length`` budget. Dropped columns hold only padding (mask 0), so every loss is
        unchanged; each bucket compiles once."""
        width = next(b for b in completion_buckets(self.cfg.max_completion_length) if b >= roll["lengths"].max())
        return {k: v[:, :width] if v.ndim == 2 else v for k, v in roll.items()}

    @staticmethod
    def cut_prompts(prompt_ids: np.ndarray, prompt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompts [B, P] cut to the smallest width of :func:`completion_buckets` (P) that holds the
        longest prompt: the dropped leading columns are padding in every row, so the log-probs, scoring and the
        update see the same tokens and positions over fewer columns. The data's length buckets start at 64 by
        default, so a batch of 25-token prompts trains 32 prompt columns instead of 64."""
        width = prompt_ids.shape[1]
        keep = next(b for b in completion_buckets(width) if b >= int(prompt_mask.sum(axis=1).max()))
        return prompt_ids[:, width - keep :], prompt_mask[:, width - keep :]

    def sampling(self, trainer, n: int = 1, greedy: bool = False) -> dict:
        """The sampler's settings for ``n`` completions per prompt (``jaxalign plan`` compiles with them too)."""
        cfg = self.cfg
        return dict(
            max_new_tokens=cfg.max_completion_length, temperature=0.0 if greedy else cfg.temperature,
            top_k=max(cfg.top_k, 0), top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
            stop_token_ids=self.stop_ids, num_return_sequences=n, pad_token_id=trainer.pad_id, mesh=trainer.mesh,
        )

    def state_dict(self) -> dict:
        return {"generation": self.generation}

    def load_state_dict(self, state: dict) -> None:
        self.generation = int(state.get("generation", 0))
