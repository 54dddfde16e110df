"""Paired preference training: DPO (every loss type, mixtures, RPO), CPO, SimPO and ORPO.

Chosen and rejected run through the model in one concatenated forward. The losses come from
:mod:`jaxalign.losses.preference`; this module only gathers log-probs, calls them, and turns
per-pair values into contributions to the full-batch means (see :mod:`jaxalign.trainers.step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.data.batching import BatchIterator
from jaxalign.data.shards import AnnotatedRows
from jaxalign.losses import cpo_loss, dpo_loss, orpo_loss, simpo_loss
from jaxalign.losses.preference import LENGTH_AVERAGED, clear_wins, preference_loss_types
from jaxalign.parallel.activations import mesh_context
from jaxalign.parallel.distributed import host_array
from jaxalign.parallel.rules import batch_sharding
from jaxalign.trainers import shared_prefix
from jaxalign.trainers.algorithm import OfflineAlgorithm
from jaxalign.trainers.logprobs import masked_row_sums, predicting_positions, sequence_logps, token_stats


def pair_forward(model, micro, *, mean_logits: bool = True):
    """Chosen and rejected in one forward: (sum logps [2B], token counts [2B], vocabulary-mean logits
    [2B, L] (None unless ``mean_logits``), per-token logps [2B, L], loss masks [2B, L], attention masks
    [2B, L]).

    The LM head runs over every position, in chunks (:func:`jaxalign.trainers.logprobs.head_stats`):
    the ``logits/*`` metrics of CPO, SimPO and ORPO average every position, and ORPO's NLL covers the
    prompt. A shared-prefix batch (``input_ids`` [B, P + 2R], :func:`jaxalign.data.collate.collate_pair_shared`)
    runs each prompt once and gives the same values over the replies' R slots: L = R, position j the reply's
    token j (its log-prob, the vocabulary mean of the logits predicting it), the attention masks None."""
    if "input_ids" in micro:
        width = micro["chosen_loss_mask"].shape[1]
        out = shared_prefix.completion_stats(model, micro["input_ids"], micro["attention_mask"], (width, width),
                                             mean_logits=mean_logits)
        halves = lambda x: None if x is None else jnp.concatenate([x[:, :width], x[:, width:]])
        mask = jnp.concatenate([micro["chosen_loss_mask"], micro["rejected_loss_mask"]])
        sums, counts = sequence_logps(halves(out.logps), mask)
        return sums, counts, halves(out.mean_logits), halves(out.logps), mask, None
    ids = jnp.concatenate([micro["chosen_input_ids"], micro["rejected_input_ids"]])
    attn = jnp.concatenate([micro["chosen_attention_mask"], micro["rejected_attention_mask"]])
    mask = jnp.concatenate([micro["chosen_loss_mask"], micro["rejected_loss_mask"]])
    stats = token_stats(model, ids, attn, mean_logits=mean_logits)
    sums, counts = sequence_logps(stats.logps, mask)
    return sums, counts, stats.mean_logits, stats.logps, mask, attn


class PairPreference(OfflineAlgorithm):
    """``--rlhf_type dpo|cpo|simpo|orpo``: chosen and rejected of each row in one forward.

    Logged metrics mean what TRL's trainer of the same algorithm logs (``DPOTrainer``; ``CPOTrainer``
    for CPO and SimPO; ``ORPOTrainer``): see :meth:`logit_positions`, :meth:`nll_tokens` and the
    ``logps/*`` and ``rewards/*`` notes in :meth:`loss_fn`."""

    curve_keys = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss")

    def __init__(self, cfg):
        self.name = cfg.rlhf_type
        super().__init__(cfg)
        self.beta = cfg.beta
        self.loss_types, self.loss_weights = preference_loss_types(self.name, cfg.loss_type, cfg.loss_weights)
        self.nll_weight = {"dpo": cfg.rpo_alpha, "cpo": cfg.cpo_alpha, "simpo": cfg.cpo_alpha, "orpo": 1.0}[self.name]
        # MPO: an "sft" entry in a DPO mixture adds the chosen NLL with its weight.
        self.nll_weight += sum(w for t, w in zip(self.loss_types, self.loss_weights) if t == "sft")
        self.needs_reference = self.name == "dpo" and not cfg.reference_free
        # DPO reads only the replies' log-probs: each prompt goes through the model once for both replies. CPO,
        # SimPO and ORPO log (and ORPO trains on) every position's logits, so they keep a sequence per reply.
        self.shares_prompts = self.name == "dpo" and bool(cfg.shared_prefix)
        # CPO's ipo and simpo, SimPO and ORPO feed length-averaged log-probs to the loss and, as TRL, log those.
        self.logs_averages = self.name in ("simpo", "orpo") or (
            self.name == "cpo" and self.loss_types[0] in LENGTH_AVERAGED)
        self._graphdef = self._rest = None
        # bco_pair: the running mean of the rewards (TRL's RunningMoments), kept on the host and
        # fed to the step; updated after each step with that step's rewards (one step behind TRL).
        self.uses_bco = "bco_pair" in self.loss_types
        self.bco_mean, self.bco_count = 0.0, 0
        self._replicated = None

    def logit_positions(self, loss_mask, attention_mask):
        """Positions averaged into ``logits/chosen`` and ``logits/rejected`` (pooled over the batch).

        DPO: the positions predicting response tokens (TRL's DPOTrainer). CPO and SimPO: every position
        (TRL's CPOTrainer takes the mean of the whole logits tensor); ORPO: every position that predicts
        a token of the sequence (TRL's ORPOTrainer drops the last). TRL also averages in padding; these
        count real tokens only, so the figure does not depend on the padded width."""
        if self.name == "dpo":
            return predicting_positions(loss_mask)
        if self.name == "orpo":
            return predicting_positions(attention_mask)
        return attention_mask

    def nll_tokens(self, loss_mask, attention_mask):
        """Tokens of the chosen NLL (``nll_loss``): the response, or for ORPO prompt and response, as TRL's
        ORPOTrainer computes it (every real token but the first, which nothing predicts)."""
        if self.name == "orpo":
            return attention_mask.astype(jnp.float32) * (jnp.arange(attention_mask.shape[-1]) > 0)
        return loss_mask.astype(jnp.float32)

    def setup(self, trainer) -> None:
        self._graphdef, self._rest = trainer.graphdef, trainer.rest
        self._replicated = NamedSharding(trainer.mesh, PartitionSpec())
        self.rows_per_step = trainer.micro_batch * trainer.accum
        if self.needs_reference:
            self.freeze_start_as_reference(trainer)
            if self.cfg.precompute_ref_log_probs:
                trainer.data.train = self.precompute(trainer, trainer.data.train)
                trainer.data.val = self.precompute(trainer, trainer.data.val)
                trainer.batches.examples = trainer.data.train
                self.ref_params = None  # no reference params kept on device afterwards
        super().setup(trainer)

    def extra(self):
        if not self.uses_bco:
            return self.ref_params
        delta = jax.device_put(jnp.asarray(self.bco_mean, jnp.float32), self._replicated)
        return {"ref": self.ref_params, "bco_delta": delta}

    def after_step(self, metrics) -> None:
        """Fold this step's rewards into the bco_pair running mean."""
        if not self.uses_bco:
            return
        batch_mean = 0.5 * (float(metrics["rewards/chosen"]) + float(metrics["rewards/rejected"]))
        n = 2 * self.rows_per_step
        total = self.bco_count + n
        self.bco_mean = (self.bco_mean * self.bco_count + batch_mean * n) / total
        self.bco_count = total

    def logit_mask(self, loss_mask, attention_mask):
        """:meth:`logit_positions` of a plain batch; a shared-prefix batch's values already sit at the replies'
        tokens (only DPO shares prompts), so its loss mask."""
        return loss_mask if attention_mask is None else self.logit_positions(loss_mask, attention_mask)

    def totals_fn(self, batch):
        rows = batch["chosen_loss_mask"].shape[0] * batch["chosen_loss_mask"].shape[1]
        side = {k: (batch[f"{k}_loss_mask"], batch.get(f"{k}_attention_mask")) for k in ("chosen", "rejected")}
        return {
            "rows": jnp.asarray(rows, jnp.float32),
            "chosen_tokens": jnp.maximum(jnp.sum(self.nll_tokens(*side["chosen"])), 1.0),
            "chosen_logit_positions": jnp.maximum(jnp.sum(self.logit_mask(*side["chosen"])), 1.0),
            "rejected_logit_positions": jnp.maximum(jnp.sum(self.logit_mask(*side["rejected"])), 1.0),
        }

    def loss_fn(self, model, micro, totals, extra, rng):
        bco_delta = 0.0
        if self.uses_bco:
            extra, bco_delta = extra["ref"], extra["bco_delta"]
        b = micro["chosen_loss_mask"].shape[0]
        sums, counts, mean_logits, tlp, mask, attn = pair_forward(model, micro)
        avg = sums / jnp.maximum(counts, 1.0)
        nll_sum = -jnp.sum(tlp[:b] * self.nll_tokens(mask[:b], None if attn is None else attn[:b]))
        logit_sums = masked_row_sums(mean_logits, self.logit_mask(mask, attn))
        ref_sums = ref_avg = None
        if self.name == "dpo" and not self.cfg.reference_free:
            if "ref_chosen_logps" in micro:
                ref_sums = jnp.concatenate([micro["ref_chosen_logps"], micro["ref_rejected_logps"]])
            else:
                ref_model = nnx.merge(self._graphdef, extra, self._rest)
                ref_sums = jax.lax.stop_gradient(pair_forward(ref_model, micro, mean_logits=False)[0])
            ref_avg = ref_sums / jnp.maximum(counts, 1.0)
        losses, chosen_r, rejected_r, extra_metrics = self._losses(sums, avg, ref_sums, ref_avg, b, bco_delta)
        # The log-probs behind the rewards, for telling a win from float32 rounding (clear_wins).
        logged = avg if self.logs_averages else sums
        behind = jnp.abs(logged) if ref_sums is None else jnp.abs(sums) + jnp.abs(ref_sums)
        magnitude = self.beta * (behind[:b] + behind[b:])
        rows = totals["rows"]
        nll = nll_sum / totals["chosen_tokens"]
        loss = jnp.sum(losses) / rows + self.nll_weight * nll
        metrics = {
            "rewards/chosen": jnp.sum(chosen_r) / rows,
            "rewards/rejected": jnp.sum(rejected_r) / rows,
            "rewards/accuracies": jnp.sum(clear_wins(chosen_r - rejected_r, magnitude)) / rows,
            "rewards/margins": jnp.sum(chosen_r - rejected_r) / rows,
            # DPO logs summed log-probs whatever the loss type; CPO's ipo, SimPO and ORPO the averages.
            "logps/chosen": jnp.sum(logged[:b]) / rows,
            "logps/rejected": jnp.sum(logged[b:]) / rows,
            "logits/chosen": jnp.sum(logit_sums[:b]) / totals["chosen_logit_positions"],
            "logits/rejected": jnp.sum(logit_sums[b:]) / totals["rejected_logit_positions"],
            "nll_loss": nll,
        }
        metrics.update({k: v * b / rows for k, v in extra_metrics.items()})
        return loss, metrics

    # ----- the math dispatch --------------------------------------------------------------
    def _losses(self, sums, avg, ref_sums, ref_avg, b, bco_delta=0.0):
        cfg, beta = self.cfg, self.beta
        extra: dict = {}
        if self.name == "dpo":
            total = jnp.zeros((b,), jnp.float32)
            chosen_r = jnp.zeros((b,), jnp.float32)
            rejected_r = jnp.zeros((b,), jnp.float32)
            for t, w in zip(self.loss_types, self.loss_weights):
                if t == "sft":  # counted in nll_weight
                    continue
                pol, ref = (avg, ref_avg) if t in LENGTH_AVERAGED else (sums, ref_sums)
                if ref is None:
                    ref = jnp.zeros_like(pol)
                losses, cr, rr = dpo_loss(
                    pol[:b], pol[b:], ref[:b], ref[b:], beta=beta, loss_type=t,
                    label_smoothing=cfg.label_smoothing, reference_free=cfg.reference_free,
                    discopop_tau=cfg.discopop_tau, bco_delta=bco_delta if t == "bco_pair" else 0.0,
                )
                if t in LENGTH_AVERAGED:  # the loss averages; the logged rewards stay beta x summed log-ratio (TRL)
                    rewards = jax.lax.stop_gradient(beta * (sums - (0.0 if ref_sums is None else ref_sums)))
                    cr, rr = rewards[:b], rewards[b:]
                total, chosen_r, rejected_r = total + w * losses, chosen_r + w * cr, rejected_r + w * rr
            return total, chosen_r, rejected_r, extra
        if self.name == "cpo":
            t = self.loss_types[0]
            pol = avg if t in LENGTH_AVERAGED else sums
            losses, cr, rr = cpo_loss(pol[:b], pol[b:], beta=beta, loss_type=t, label_smoothing=cfg.label_smoothing,
                                      simpo_gamma=cfg.simpo_gamma)
            return losses, cr, rr, extra
        if self.name == "simpo":
            losses, cr, rr = simpo_loss(avg[:b], avg[b:], beta=beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing)
            return losses, cr, rr, extra
        losses, cr, rr, ratio, chosen_odds = orpo_loss(avg[:b], avg[b:], beta=beta)
        extra = {"log_odds_ratio": ratio, "log_odds_chosen": chosen_odds}
        return losses, cr, rr, extra

    # ----- --precompute_ref_log_probs -----------------------------------------------------
    def precompute(self, trainer, examples):
        """The reference model's sequence log-probs of every example (one pass, fixed shapes), set on each example
        when it is read. On several hosts each builds its devices' rows of each batch, as in training, and the
        sums are gathered to every host."""
        if not examples:
            return examples
        graphdef, rest, ref = self._graphdef, self._rest, self.ref_params

        @jax.jit
        def ref_logps(params, batch):
            return pair_forward(nnx.merge(graphdef, params, rest), batch, mean_logits=False)[0]

        bs = trainer.micro_batch
        it = BatchIterator(examples, bs, trainer.buckets, seed=0, pad_id=trainer.pad_id, drop_last=False,
                           host_rows=trainer._host_rows(bs), shared_prefix=self.shares_prompts)
        chosen, rejected = np.zeros(len(examples)), np.zeros(len(examples))
        for idx in it.epoch_plan(0):
            idx = list(idx)
            padded = idx + [idx[-1]] * (bs - len(idx))  # keep one shape per bucket (and whole batches to split)
            batch = {k: v for k, v in it.make_batch(padded).items() if k != "margin"}
            if it.host_rows is None:
                batch = jax.device_put(batch, {k: batch_sharding(trainer.mesh, v.ndim) for k, v in batch.items()})
            else:  # this host's rows of the bs-row batch
                batch = {k: trainer.place_rows(v, bs) for k, v in batch.items()}
            with mesh_context(trainer.mesh):
                sums = host_array(ref_logps(ref, batch))  # every host: the sums span all of them
            chosen[idx], rejected[idx] = sums[: len(idx)], sums[bs : bs + len(idx)]
        return AnnotatedRows(examples, {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected})
