"""Supervised fine-tuning: token-mean negative log-likelihood of the response tokens."""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.trainers.algorithm import OfflineAlgorithm
from jaxalign.trainers.logprobs import token_stats


class SFT(OfflineAlgorithm):
    """``jaxalign sft``."""

    name = "sft"
    curve_keys = ("loss", "token_acc", "eval_loss")

    def totals_fn(self, batch):
        # Every response token of the whole accumulated batch weighs the same.
        return {"tokens": jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)}

    def loss_fn(self, model, micro, totals, extra, rng):
        # log-probs and each position's argmax from the chunked LM head (no [B, T, V] logits)
        stats = token_stats(model, micro["input_ids"], micro["attention_mask"], argmax=True)
        mask = micro["loss_mask"]
        nll = -jnp.sum(stats.logps * mask) / totals["tokens"]
        predicted = stats.argmax[:, :-1]
        correct = (predicted == micro["input_ids"][:, 1:]).astype(jnp.float32) * mask[:, 1:]
        return nll, {"token_acc": jnp.sum(correct) / totals["tokens"]}
