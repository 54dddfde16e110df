"""TRL's own trainers run for one step beside jaxalign's, on the same tiny models and rows (tests/test_trl_parity.py).

Both sides read the same Hugging Face folders. The chat template is ChatML with the newline *before*
each turn, so a conversation ends with ``<|im_end|>``: TRL trains whatever the template renders after
the reply (ChatML's trailing newline), jaxalign and ms-swift stop at the end-of-turn token, and with
this template the two tokenisations are the same ids and masks, which the tests check row by row.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file

from helpers import make_model_dir

PARITY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}"
)

# Logged by the Trainer machinery rather than the algorithm, or by one side only by design.
NOT_METRICS = {"epoch", "num_tokens", "total_flos", "train_runtime", "train_samples_per_second",
               "train_steps_per_second", "train_loss"}


# ----- models and rows ---------------------------------------------------------------------------
def model_folder(path: Path, seed: int, *, logit_scale: float = 8.0) -> Path:
    """A tiny random Llama folder whose tokenizer renders :data:`PARITY_CHAT_TEMPLATE`.

    The (tied) embeddings are scaled by ``logit_scale``: freshly initialised logits are nearly flat, so every
    reply would get about the same log-probs and reward margins would be differences of nearly equal
    numbers, where float32 rounding alone reaches the 1e-4 tolerance."""
    folder = make_model_dir(path, seed=seed)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: v * logit_scale if "embed_tokens" in k or "lm_head" in k else v for k, v in tensors.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = PARITY_CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


def reward_model_folder(backbone: Path, path: Path, seed: int) -> tuple[Path, np.ndarray]:
    """``backbone`` plus a random value head without bias (``value_head.safetensors``): the model jaxalign's
    ``rm`` starts from; TRL gets the same weights as its sequence-classification ``score``. Returns
    (folder, head weight [1, hidden])."""
    shutil.copytree(backbone, path)
    hidden = transformers.AutoConfig.from_pretrained(str(path)).hidden_size
    weight = np.random.default_rng(seed).normal(0.0, 0.3, (1, hidden)).astype(np.float32)
    save_file({"v_head.summary.weight": weight, "v_head.summary.bias": np.zeros(1, np.float32)},
              str(path / "value_head.safetensors"), metadata={"format": "pt"})
    return path, weight


def _turns(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def pair_rows(n: int) -> list[dict]:
    """ms-swift preference rows with prompts and replies of different lengths (batches are padded)."""
    return [{"messages": _turns(f"add {i} and {3 * i + 1}" + "?" * (i % 3), f"{4 * i + 1}" + " ok" * (i % 2)),
             "rejected_response": f"{4 * i + 3} i think" + "." * i} for i in range(n)]


def equal_length_pair_rows(n: int, width: int = 20) -> list[dict]:
    """Preference rows whose prompt+chosen and prompt+rejected texts are all ``width`` characters, with
    prompt and reply lengths varying. TRL's CPOTrainer and ORPOTrainer average ``logits/*`` over the
    padded tensor; without padding that is every real position, which jaxalign logs."""
    rows = []
    for i in range(n):
        prompt = f"sum {i}+{i}" + "?" * i
        rest = width - len(prompt)
        rows.append({"messages": _turns(prompt, (f"= {2 * i} " + "yes" * 9)[:rest]),
                     "rejected_response": (f"= {2 * i + 5} " + "no" * 9)[:rest]})
    return rows


def kto_rows(n: int) -> list[dict]:
    """ms-swift KTO rows (``label``), both labels present, different lengths."""
    return [{"messages": _turns(f"is {i} even" + "?" * (i % 2), ("yes" if i % 2 == 0 else "no") + "!" * (i % 3)),
             "label": i % 3 != 1} for i in range(n)]


def trl_pairs(rows: list[dict]) -> list[dict]:
    """ms-swift preference rows as TRL's conversational prompt/chosen/rejected."""
    return [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
             "rejected": [{"role": "assistant", "content": r["rejected_response"]}]} for r in rows]


def trl_unpaired(rows: list[dict]) -> list[dict]:
    """ms-swift KTO rows as TRL's conversational prompt/completion/label."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "label": r["label"]} for r in rows]


def trl_reward_pairs(rows: list[dict]) -> list[dict]:
    """ms-swift preference rows as TRL's implicit-prompt chosen/rejected conversations."""
    return [{"chosen": r["messages"], "rejected": r["messages"][:-1] + [
        {"role": "assistant", "content": r["rejected_response"]}]} for r in rows]


# ----- TRL's trainers ---------------------------------------------------------------------------
def training_args(out: Path, batch_size: int, *, learning_rate: float, max_length: int) -> dict:
    """What every TRL config here shares: one step of ``batch_size`` rows in dataset order on the CPU,
    float32, no gradient checkpointing, no dropout, logged at that step."""
    return dict(
        output_dir=str(out), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        max_length=max_length, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataset_num_proc=None,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )


def _config(config_cls, **kw):
    fields = config_cls.__dataclass_fields__
    if "activation_checkpointing" in fields:  # transformers 5 spells gradient checkpointing this way
        kw["activation_checkpointing"] = kw["gradient_checkpointing"]
    if "padding_free" in fields:
        kw["padding_free"] = False
    if "disable_dropout" in fields:
        kw["disable_dropout"] = True
    return config_cls(**{k: v for k, v in kw.items() if k in fields})


def causal_lm(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


class LogCapture(transformers.TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def first_batch(trainer) -> dict:
    """The first training batch as TRL's data loader collates it (numpy)."""
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.numpy() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def train_one_step(trainer) -> dict[str, float]:
    """The metrics TRL logs for one training step."""
    capture = LogCapture()
    trainer.add_callback(capture)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    logged = [row for row in capture.logs if "loss" in row]
    assert len(logged) == 1, capture.logs
    return {k: float(v) for k, v in logged[0].items() if k not in NOT_METRICS}


def run_one_step(trainer) -> tuple[dict, dict[str, float]]:
    """(the first training batch as numpy, the metrics TRL logs for the step)."""
    return first_batch(trainer), train_one_step(trainer)


def dpo_trainer(policy: Path, ref: Path, rows: list[dict], args: dict, *, loss_type, loss_weights=None, **hp):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = _config(DPOConfig, **args, loss_type=list(loss_type), loss_weights=loss_weights, **hp)
    return DPOTrainer(model=causal_lm(policy), ref_model=causal_lm(ref), args=cfg,
                      processing_class=transformers.AutoTokenizer.from_pretrained(str(policy)),
                      train_dataset=Dataset.from_list(trl_pairs(rows)))


def cpo_trainer(policy: Path, rows: list[dict], args: dict, **hp):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer(model=causal_lm(policy), args=_config(CPOConfig, **args, **hp),
                      processing_class=transformers.AutoTokenizer.from_pretrained(str(policy)),
                      train_dataset=Dataset.from_list(trl_pairs(rows)))


def orpo_trainer(policy: Path, rows: list[dict], args: dict, **hp):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(model=causal_lm(policy), args=_config(ORPOConfig, **args, **hp),
                       processing_class=transformers.AutoTokenizer.from_pretrained(str(policy)),
                       train_dataset=Dataset.from_list(trl_pairs(rows)))


def kto_trainer(policy: Path, ref: Path, rows: list[dict], args: dict, **hp):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer(model=causal_lm(policy), ref_model=causal_lm(ref), args=_config(KTOConfig, **args, **hp),
                      processing_class=transformers.AutoTokenizer.from_pretrained(str(policy)),
                      train_dataset=Dataset.from_list(trl_unpaired(rows)))


def reward_trainer(folder: Path, head: np.ndarray, rows: list[dict], args: dict, **hp):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=1, dtype=torch.float32, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.score.weight.copy_(torch.from_numpy(head))
    return RewardTrainer(model=model, args=_config(RewardConfig, **args, **hp), processing_class=tok,
                         train_dataset=Dataset.from_list(trl_reward_pairs(rows)))


# ----- the sequences each side trains on ---------------------------------------------------------
def sequences(ids: np.ndarray, attention: np.ndarray, trained: np.ndarray | None = None) -> list[tuple]:
    """Each row's real tokens as (ids, trained-token mask), padding dropped wherever it sits."""
    out = []
    for r in range(ids.shape[0]):
        keep = np.asarray(attention[r]).astype(bool)
        mask = () if trained is None else tuple(int(x) for x in np.asarray(trained[r])[keep])
        out.append((tuple(int(x) for x in np.asarray(ids[r])[keep]), mask))
    return out


def trl_pair_sequences(kind: str, batch: dict) -> list[tuple]:
    """Chosen rows then rejected rows of a TRL preference batch, as :func:`sequences`."""
    if kind == "dpo":
        return sequences(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    out = []
    for side in ("chosen", "rejected"):
        out += sequences(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"] != -100)
    return out


def jaxalign_pair_sequences(micro: dict) -> list[tuple]:
    return [s for side in ("chosen", "rejected") for s in sequences(
        micro[f"{side}_input_ids"], micro[f"{side}_attention_mask"], micro[f"{side}_loss_mask"])]
