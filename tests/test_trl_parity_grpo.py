"""One GRPO step of jaxalign next to one of TRL's ``GRPOTrainer`` on a fixed rollout batch.

Sampling cannot be made to agree across two frameworks, so both samplers are replaced by the same fixed
completions (two prompts x four, one of them cut at the completion budget); everything after sampling is
each side's own code: the reward function's scores, group advantages, the reference (a different model)
log-probs, the loss, its gradient and the logged metrics. The fixed completions are on-policy: jaxalign
gets the policy's own log-probs as the rollout's (TRL recomputes them), so the ratios are 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("trl")

import trl_side as trl  # noqa: E402
from helpers import config, write_jsonl  # noqa: E402
import jaxalign.rewards  # noqa: E402
from jaxalign.trainers.run import build_trainer  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6
G, COMPLETION_BUDGET, TEMPERATURE, BETA = 4, 12, 0.7, 0.04
PROMPTS = ["add 12 and 30", "add 41 and 17"]  # the same number of tokens: TRL's batch has no prompt padding
COMPLETIONS = {  # per prompt, G replies; "<E>" is the end-of-turn token; the last of the second group is cut
    PROMPTS[0]: ["42<E>", "it is 42<E>", "43<E>", "4<E>"],
    PROMPTS[1]: ["58<E>", "fifty eight<E>", "57 or 58<E>", "58 58 58 555"],
}
# ms-swift's (and jaxalign's) reward_std is the mean within-group standard deviation; TRL 1.16 logs the
# standard deviation over the whole batch (README, "Where jaxalign differs").
NOT_COMPARED = {"reward_std"}
EXPECTED = {"loss", "grad_norm", "learning_rate", "kl", "entropy", "reward", "frac_reward_zero_std",
            "rewards/parity_reward/mean", "rewards/parity_reward/std", "completions/mean_length",
            "completions/min_length", "completions/max_length", "completions/clipped_ratio"}
# loss type -> (jaxalign options, TRL's, the loss type's own metrics)
LOSSES = {
    "grpo": ({}, {}, {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}),
    "cispo": ({"epsilon_high": 5.0}, {"epsilon_high": 5.0}, {"cispo_clip_ratio"}),
    "sapo": ({"tau_pos": 0.9, "tau_neg": 1.2}, {"sapo_temperature_pos": 0.9, "sapo_temperature_neg": 1.2}, set()),
}


def parity_reward(completions, **kwargs):
    """Number of '5's minus a tenth of the length: graded, different within each group."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(t.count("5")) - 0.1 * len(t) for t in texts]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_parity_grpo")
    # unscaled (nearly flat) logits keep every per-token KL far below ms-swift's clamp at 10, which TRL
    # does not apply (README); the advantages come from the rewards, so flat logits cost nothing here
    policy = trl.model_folder(root / "policy", seed=0, logit_scale=1.0)
    ref = trl.model_folder(root / "ref", seed=1, logit_scale=1.0)
    tok = transformers.AutoTokenizer.from_pretrained(str(policy))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    replies = {p: [tok(c.replace("<E>", ""), add_special_tokens=False)["input_ids"] + ([eos] if c.endswith("<E>") else [])
                   for c in cs] for p, cs in COMPLETIONS.items()}
    assert all(len(r) <= COMPLETION_BUDGET for rs in replies.values() for r in rs)
    assert sum(len(r) == COMPLETION_BUDGET and r[-1] != eos for rs in replies.values() for r in rs) == 1
    jaxalign.rewards.register("parity_reward")(parity_reward)
    yield dict(root=root, policy=policy, ref=ref, tok=tok, eos=eos, replies=replies)
    jaxalign.rewards.unregister("parity_reward")


def prompt_of(tok, prompt_ids) -> str:
    text = tok.decode([int(i) for i in prompt_ids], skip_special_tokens=True)
    (found,) = [p for p in PROMPTS if p in text]
    return found


def policy_logps(folder, prompt_ids: list[int], completion: list[int]) -> np.ndarray:
    """log p(completion tokens) under the policy at the sampling temperature (what a sampler records)."""
    model = trl.causal_lm(folder).eval()
    ids = torch.tensor([list(prompt_ids) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / TEMPERATURE
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
    return logp.numpy()


def jaxalign_step(world, loss_type):
    root = world["root"]
    rows = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS]
    cfg = config(world["policy"], write_jsonl(root / "prompts.jsonl", rows), root / f"out_{loss_type}", rlhf_type="grpo",
                 ref_model=str(world["ref"]), reward_funcs="parity_reward", num_generations=G,
                 per_device_train_batch_size=G * len(PROMPTS), gradient_accumulation_steps=1, max_steps=1,
                 max_completion_length=COMPLETION_BUDGET, temperature=TEMPERATURE, beta=BETA, epsilon=0.2,
                 loss_type=loss_type, scale_rewards="group", learning_rate=1e-3, save_hf=False, seed=0,
                 **LOSSES[loss_type][0])
    tr = build_trainer(cfg, quiet=True)
    seen = {}

    def fixed_sample(trainer, prompt_ids, prompt_mask, *, n=1, greedy=False):
        rows = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            real = [int(i) for i in ids[mask > 0]]
            prompt = prompt_of(world["tok"], real)
            seen[prompt] = real
            rows += [(real, reply) for reply in world["replies"][prompt]]
        tokens = np.zeros((len(rows), COMPLETION_BUDGET), np.int32)
        logps = np.zeros((len(rows), COMPLETION_BUDGET), np.float32)
        for i, (real, reply) in enumerate(rows):
            tokens[i, : len(reply)] = reply
            logps[i, : len(reply)] = policy_logps(world["policy"], real, reply)
        lengths = np.asarray([len(r) for _, r in rows], np.int32)
        return {"tokens": tokens, "logps": logps, "lengths": lengths,
                "mask": (np.arange(COMPLETION_BUDGET)[None] < lengths[:, None]).astype(np.int32),
                "finished": np.asarray([r[-1] == world["eos"] for _, r in rows])}

    tr.algo.sample = fixed_sample  # the instance attribute: called as algo.sample(trainer, ...)
    captured = {}
    make_arrays = tr.algo.generation_batch_arrays

    def capture(trainer, prompt_batch):
        arrays, metrics, samples = make_arrays(trainer, prompt_batch)
        captured["samples"] = samples
        return arrays, metrics, samples

    tr.algo.generation_batch_arrays = capture
    metrics = tr.algo.run_step(tr)
    advantages = {(s["prompt"], s["completion"]): s["advantage"] for s in captured["samples"]}
    return metrics, seen, advantages


def trl_step(world, loss_type):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = trl.training_args(world["root"] / f"trl_{loss_type}", G * len(PROMPTS), learning_rate=1e-3, max_length=None)
    cfg = trl._config(GRPOConfig, **args, num_generations=G, max_completion_length=COMPLETION_BUDGET,
                      temperature=TEMPERATURE, beta=BETA, epsilon=0.2, loss_type=loss_type, scale_rewards="group",
                      **LOSSES[loss_type][1],
                      shuffle_dataset=False, log_completions=False,
                      # TRL 1.16 multiplies the KL by the (detached-valued) importance ratio by default, which
                      # changes its gradient, not its value; ms-swift and jaxalign add the plain k3 KL (README)
                      use_bias_correction_kl=False)
    policy = trl.causal_lm(world["policy"])
    # GRPOTrainer loads (and patches) its reference from the policy's config path: point it at the other model
    policy.config._name_or_path = str(world["ref"])
    trainer = GRPOTrainer(model=policy, reward_funcs=[parity_reward], args=cfg, processing_class=world["tok"],
                          train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]))
    seen = {}

    def fixed_generation(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        taken = {p: 0 for p in PROMPTS}
        out = []
        for ids in prompt_ids:
            prompt = prompt_of(world["tok"], ids)
            seen[prompt] = [int(i) for i in ids]
            out.append(list(world["replies"][prompt][taken[prompt]]))
            taken[prompt] += 1
        return out, None

    trainer._generate_single_turn = fixed_generation
    captured = {}
    score = trainer._generate_and_score_completions

    def capture(inputs):
        out = score(inputs)
        captured["rows"] = (out["completion_ids"].numpy(), out["completion_mask"].numpy(), out["advantages"].numpy())
        return out

    trainer._generate_and_score_completions = capture
    metrics = trl.train_one_step(trainer)
    completion_ids, completion_mask, adv = captured["rows"]
    advantages = {}
    for ids, mask, a in zip(completion_ids, completion_mask, adv):
        text = world["tok"].decode([int(i) for i, m in zip(ids, mask) if m], skip_special_tokens=True)
        advantages[text] = float(a)
    return metrics, seen, advantages


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_grpo_step_on_fixed_rollouts_matches_trl(world, loss_type):
    ours, our_prompts, our_adv = jaxalign_step(world, loss_type)
    theirs, their_prompts, their_adv = trl_step(world, loss_type)
    assert our_prompts == their_prompts  # the same prompt token ids on both sides
    # group advantages from each side's own reward scores: one per completion text (all distinct)
    assert len(their_adv) == G * len(PROMPTS) and len(our_adv) == G * len(PROMPTS)
    for (_, text), adv in our_adv.items():
        assert math.isclose(adv, their_adv[text], rel_tol=RTOL, abs_tol=ATOL), (text, adv, their_adv[text])
    worst_adv = max(abs(a - their_adv[t]) / max(abs(their_adv[t]), ATOL / RTOL) for (_, t), a in our_adv.items())
    print(f"\ngrpo advantages: worst relative gap {worst_adv:.1e}")
    compared = set(ours) & set(theirs) - NOT_COMPARED
    expected = EXPECTED | LOSSES[loss_type][2]
    assert expected <= compared, f"not compared: {sorted(expected - compared)}"
    gaps = {k: abs(ours[k] - theirs[k]) / max(abs(theirs[k]), ATOL / RTOL) for k in compared}
    print(f"\n{loss_type}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(gaps.items())))
    print(f"{loss_type}: loss {ours['loss']!r} / {theirs['loss']!r}, "
          f"grad_norm {ours['grad_norm']!r} / {theirs['grad_norm']!r}")
    for name in sorted(compared):
        assert math.isclose(ours[name], theirs[name], rel_tol=RTOL, abs_tol=ATOL), (
            f"{name}: jaxalign {ours[name]!r}, TRL {theirs[name]!r}")
    assert ours["kl"] > 1e-4 and ours["grad_norm"] > 0  # the reference differs, the batch carries signal
