"""Reward-model training (``--rlhf_type rm``): Bradley-Terry on a value head, as TRL's RewardTrainer.

The trainer's model is a :class:`jaxalign.models.value_head.RewardModel` (the loaded backbone
plus a freshly initialised head, or the head saved beside ``--model``). Chosen and rejected are
scored in one concatenated forward; the math is :func:`jaxalign.losses.reward_loss`.
``--rm_head value_head`` (default) trains TRL's value head (with bias) and exports the backbone plus
``value_head.safetensors``; ``--rm_head seq_cls`` trains a bias-free ``score`` head read at the token
``transformers`` reads, and exports a ``*ForSequenceClassification`` folder.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from jaxalign.convert.checkpoint_io import is_reward_checkpoint, load_checkpoint_model
from jaxalign.convert.reward_model import head_files, save_reward_model_folder
from jaxalign.convert.value_head_io import VALUE_HEAD_FILE, load_value_head, place_on_mesh
from jaxalign.data.tokenizer import pad_id_of
from jaxalign.losses.reward import reward_loss
from jaxalign.models.value_head import RewardModel, new_reward_model
from jaxalign.trainers.algorithm import OfflineAlgorithm
from jaxalign.trainers.tuner import export_adapter


def pair_scores(model: RewardModel, micro):
    """(chosen scores [B], rejected scores [B]) from one forward over both."""
    b = micro["chosen_input_ids"].shape[0]
    ids = jnp.concatenate([micro["chosen_input_ids"], micro["rejected_input_ids"]])
    attn = jnp.concatenate([micro["chosen_attention_mask"], micro["rejected_attention_mask"]])
    s = model.scores(ids, attn)
    return s[:b], s[b:]


class RewardModelling(OfflineAlgorithm):
    """``--rlhf_type rm``: the backbone plus a value head, the head trained fully."""

    name = "rm"
    curve_keys = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_accuracy")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.center = cfg.get("center_rewards_coefficient")
        self.head = cfg.get("rm_head") or "value_head"

    def prepare_model(self, model, mesh, tokenizer) -> RewardModel:
        """The backbone plus a value head: the one saved beside --model, else a fresh seeded one. A seq_cls head
        skips the tokenizer's pad id when it picks the scored token, as the exported folder will in transformers."""
        if isinstance(model, RewardModel):
            return model
        kind = {"head": self.head, "pad_token_id": pad_id_of(tokenizer) if self.head == "seq_cls" else None}
        self.pad_token_id = kind["pad_token_id"]
        src = Path(self.cfg.model) if self.cfg.get("model") else None
        if src is not None and is_reward_checkpoint(src):  # continue from an rm checkpoint: keep its head
            head = load_checkpoint_model(src, value_head=True).v_head
            return RewardModel(model, place_on_mesh(head, mesh), **kind)
        if src is not None and (src / VALUE_HEAD_FILE).is_file():
            head = place_on_mesh(load_value_head(src, model.config.hidden_size), mesh)
            return RewardModel(model, head, **kind)
        return place_on_mesh(new_reward_model(model, seed=int(self.cfg.seed), **kind), mesh)

    def state_dict(self) -> dict:
        """Kept in each checkpoint's meta: the pad id a seq_cls head skips (so an export scores as training did)."""
        return {"rm_pad_token_id": getattr(self, "pad_token_id", None)}

    def totals_fn(self, batch):
        return {"rows": jnp.asarray(batch["chosen_input_ids"].shape[0] * batch["chosen_input_ids"].shape[1], jnp.float32)}

    def loss_fn(self, model, micro, totals, extra, rng):
        b = micro["chosen_input_ids"].shape[0]
        chosen, rejected = pair_scores(model, micro)
        share = b / totals["rows"]  # this micro-batch's weight in the full-batch mean
        margin = micro.get("margin")
        loss = reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=self.center) * share
        acc = jnp.mean((chosen > rejected).astype(jnp.float32)) * share
        metrics = {
            "rewards/chosen": jnp.mean(chosen) * share,
            "rewards/rejected": jnp.mean(rejected) * share,
            "rewards/accuracies": acc,
            "rewards/margins": jnp.mean(chosen - rejected) * share,
            "accuracy": acc,
        }
        if self.center is not None:
            metrics["center_rewards_loss"] = self.center * jnp.mean((chosen + rejected) ** 2) * share
        return loss, metrics

    def export(self, trainer) -> None:
        """value_head: backbone as a Hugging Face folder in output_dir, head as output_dir/value_head.safetensors
        (under LoRA: the backbone's adapter in PEFT's format, with the fully trained head beside it); seq_cls: a
        ``*ForSequenceClassification`` folder."""
        model = trainer.model()
        if self.lora is not None:
            export_adapter(self, trainer, model.backbone, trainer.out, base_model=self.cfg.model,
                           extra_files=head_files(model))
            return
        save_reward_model_folder(model, trainer.cfg.output_dir, tokenizer=trainer.tokenizer, overwrite=True)
