"""KTO (Ethayarajh et al. 2024) as TRL's ``KTOTrainer`` computes it, for the shared Trainer.

Rows are single (prompt, completion) examples with a boolean ``label``. Shapes are static in
jit, so every row's loss is computed both as desirable and as undesirable and the right one is
selected by ``label``. The KL reference point comes from the mismatched pairs of the same
micro-batch (prompt i with completion i-1, as TRL pairs them, built by :func:`jaxalign.data.collate.collate_kto`).
The math lives in :func:`jaxalign.losses.kto_loss` and :func:`jaxalign.losses.kto_kl`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.errors import ConfigError
from jaxalign.losses.preference import clear_wins, kto_kl, kto_loss
from jaxalign.trainers.algorithm import OfflineAlgorithm
from jaxalign.trainers.logprobs import masked_row_sums, predicting_positions, sequence_logps, token_stats


def kto_forward(model, micro, *, mean_logits: bool = True, kl_pairs: bool = True):
    """From one forward over the rows and their KL pairs: sequence log-probs (sums over completion
    tokens) of the rows [B] and of the KL pairs [B] (None without ``kl_pairs``: the rows alone go through the
    model), and per row the sum over the positions predicting its completion of the vocabulary-mean logit [B]
    (for ``logits/*``; None unless ``mean_logits``). The LM head runs in chunks
    (:func:`jaxalign.trainers.logprobs.head_stats`)."""
    b = micro["input_ids"].shape[0]
    extra = ("kl_",) if kl_pairs else ()
    ids = jnp.concatenate([micro[p + "input_ids"] for p in ("", *extra)])
    attn = jnp.concatenate([micro[p + "attention_mask"] for p in ("", *extra)])
    mask = jnp.concatenate([micro[p + "loss_mask"] for p in ("", *extra)])
    stats = token_stats(model, ids, attn, mean_logits=mean_logits)
    sums, _ = sequence_logps(stats.logps, mask)
    logit_sums = None
    if mean_logits:
        logit_sums = masked_row_sums(stats.mean_logits[:b], predicting_positions(micro["loss_mask"]))
    return sums[:b], (sums[b:] if kl_pairs else None), logit_sums


class KTO(OfflineAlgorithm):
    """``--rlhf_type kto``: the reference is the starting model, or ``--ref_model``."""

    name = "kto"
    curve_keys = ("loss", "rewards/margins", "kl", "eval_loss")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta = cfg.beta
        self.desirable_weight = float(cfg.desirable_weight)
        self.undesirable_weight = float(cfg.undesirable_weight)
        self.loss_type = cfg.loss_type or "kto"
        self.uses_kl = self.loss_type == "kto"  # apo_zero_unpaired has no reference point: no KL pairs to score
        self._graphdef = self._rest = None

    def setup(self, trainer) -> None:
        if self.uses_kl and trainer.micro_batch < 2:
            raise ConfigError(
                "kto estimates its KL reference point from mismatched pairs inside a micro-batch, which needs "
                f"at least 2 rows (got {trainer.micro_batch}); raise --per_device_train_batch_size"
            )
        self._graphdef, self._rest = trainer.graphdef, trainer.rest
        self.freeze_start_as_reference(trainer)
        super().setup(trainer)

    def totals_fn(self, batch):
        label = batch["label"].astype(jnp.float32)
        positions = jnp.sum(predicting_positions(batch["loss_mask"]), axis=-1)
        return {
            "rows": jnp.asarray(label.size, jnp.float32),
            "chosen": jnp.maximum(jnp.sum(label), 1.0),
            "rejected": jnp.maximum(jnp.sum(1.0 - label), 1.0),
            "chosen_positions": jnp.maximum(jnp.sum(positions * label), 1.0),
            "rejected_positions": jnp.maximum(jnp.sum(positions * (1.0 - label)), 1.0),
        }

    def loss_fn(self, model, micro, totals, extra, rng):
        b = micro["input_ids"].shape[0]
        logps, kl_logps, logit_sums = kto_forward(model, micro, kl_pairs=self.uses_kl)
        ref_model = nnx.merge(self._graphdef, extra, self._rest)
        ref_logps, ref_kl_logps, _ = jax.lax.stop_gradient(
            kto_forward(ref_model, micro, mean_logits=False, kl_pairs=self.uses_kl))
        kl = kto_kl(kl_logps, ref_kl_logps) if self.uses_kl else jnp.zeros((), jnp.float32)  # TRL logs 0
        losses, rewards, _ = kto_loss(
            logps, logps, ref_logps, ref_logps, kl, beta=self.beta,
            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )
        good = micro["label"].astype(bool)
        g = good.astype(jnp.float32)
        u = 1.0 - g
        row_loss = jnp.where(good, losses[:b], losses[b:])
        # rewards = beta * (logp - ref_logp) of every row, whichever its label
        rows, nc, nr = totals["rows"], totals["chosen"], totals["rejected"]
        chosen_r = jnp.sum(rewards * g) / nc
        rejected_r = jnp.sum(rewards * u) / nr
        # a reward within float32 rounding of 0 (reference == policy) has no sign (see clear_wins)
        magnitude = self.beta * (jnp.abs(logps) + jnp.abs(ref_logps))
        correct = jnp.where(good, clear_wins(rewards, magnitude), clear_wins(-rewards, magnitude))
        metrics = {
            "rewards/chosen": chosen_r,
            "rewards/rejected": rejected_r,
            "rewards/margins": chosen_r - rejected_r,
            # share of rows whose implicit reward has the sign of its label
            "rewards/accuracies": jnp.sum(correct) / rows,
            "logps/chosen": jnp.sum(logps * g) / nc,
            "logps/rejected": jnp.sum(logps * u) / nr,
            # TRL's KTOTrainer: pooled over the positions predicting completion tokens of each label
            "logits/chosen": jnp.sum(logit_sums * g) / totals["chosen_positions"],
            "logits/rejected": jnp.sum(logit_sums * u) / totals["rejected_positions"],
            "kl": kl * b / rows,
        }
        return jnp.sum(row_loss) / rows, metrics
