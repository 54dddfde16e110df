"""LoRA (``--tuner_type lora``): PEFT-format adapters both ways, the merged export against PEFT's
``merge_and_unload``, the adapters-off reference, step 0 equal to full fine-tuning, only adapters (and an RM's
head) trained, every algorithm end to end, ``--adapters``/``--ref_adapters``, ``infer --adapters`` and the
one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jaxalign.cli import main
from jaxalign.convert import load_hf_model
from jaxalign.convert.peft_io import apply_adapter, save_adapter
from jaxalign.models.lora import LoRASettings, add_lora, has_lora
from jaxalign.trainers.run import build_trainer
from helpers import (
    assert_merged_equals_peft,
    compiled_call,
    config,
    hf_logits,
    make_base,
    np_token_logps,
    one_error_line,
    short_rows,
    write_jsonl,
)

peft = pytest.importorskip("peft")

IDS = np.array([[5, 17, 23, 41, 9, 2, 30, 12], [0, 0, 8, 19, 27, 33, 6, 14]], np.int32)
MASK = np.array([[1] * 8, [0, 0] + [1] * 6], np.int32)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root / "base", seed=21)
    rows = short_rows(16, seed=22)
    files = {
        "sft": write_jsonl(root / "sft.jsonl", rows),
        "pairs": write_jsonl(root / "pairs.jsonl", [{**r, "rejected_response": r["solution"] + "7"} for r in rows]),
        "kto": write_jsonl(root / "kto.jsonl", [{**r, "label": i % 2 == 0} for i, r in enumerate(rows)]),
    }
    return {"root": root, "base": base, "files": files}


def torch_logits(model, ids=IDS, mask=MASK) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids.astype(np.int64)), attention_mask=torch.as_tensor(mask.astype(np.int64)))
    return out.logits.float().numpy()


def real(x: np.ndarray) -> np.ndarray:
    return x[MASK > 0]


def hf_base(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ----- PEFT format, both directions, and the merged export --------------------------------------------------
def test_jaxalign_adapter_loads_in_peft_with_the_same_logits(env, tmp_path):
    model = load_hf_model(env["base"])
    settings = LoRASettings(rank=4, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"),
                            init_lora_weights=False)  # B random, so the adapter changes the logits
    add_lora(model, settings, seed=5)
    save_adapter(model, tmp_path / "adapter", settings=settings, base_model=env["base"])
    ours = compiled_call(model)(IDS, MASK)

    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 3  # 2 layers x 3 modules x (A, B)
    peft_model = peft.PeftModel.from_pretrained(hf_base(env["base"]), str(tmp_path / "adapter")).eval()
    theirs = torch_logits(peft_model)
    base_logits = torch_logits(hf_base(env["base"]))
    assert np.abs(real(theirs) - real(base_logits)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(real(ours), real(theirs), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def peft_adapter(env):
    """An adapter PEFT made (random non-zero B, rsLoRA, a subset of modules), saved by PEFT."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                          init_lora_weights=False, use_rslora=True, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_base(env["base"]), cfg).eval()
    folder = env["root"] / "peft_adapter"
    model.save_pretrained(str(folder))
    return folder, torch_logits(model), model


def test_peft_adapter_loads_in_jaxalign_with_the_same_logits(env, peft_adapter):
    folder, theirs, _ = peft_adapter
    model = load_hf_model(env["base"])
    settings = apply_adapter(model, folder)
    assert settings.use_rslora and settings.rank == 4
    assert settings.target_modules == ("k_proj", "o_proj", "gate_proj", "up_proj")
    np.testing.assert_allclose(real(compiled_call(model)(IDS, MASK)), real(theirs), atol=1e-4, rtol=1e-4)


def test_merged_export_equals_peft_merge_and_unload(env, peft_adapter, tmp_path):
    folder, _, peft_model = peft_adapter
    out = tmp_path / "merged"
    assert main(["export", "--adapters", str(folder), "--model", env["base"], "--merge_lora", "true",
                 "--output_dir", str(out)]) == 0
    ours = assert_merged_equals_peft(out, peft_model)
    assert not any("lora" in k for k in ours)


# ----- training: step 0, the reference, what changes ----------------------------------------------------------
def dpo_trainer(env, out, **over):
    cfg = config(env["base"], env["files"]["pairs"], out, rlhf_type="dpo", per_device_train_batch_size=4,
                 gradient_accumulation_steps=1, learning_rate=1e-2, max_steps=2, **over)
    return build_trainer(cfg, quiet=True)


def test_lora_dpo_step0_equals_full_dpo_and_reference_is_the_base(env, tmp_path):
    lora = dpo_trainer(env, tmp_path / "lora", tuner_type="lora")  # default dropout 0.05: B = 0 hides it
    assert has_lora(lora.model())
    batch = lora.algo.next_step_batch(lora)
    m_lora = jax.device_get(lora.train_step(batch))
    # Step 0 is full DPO from the base with reference = policy: every margin is 0, so the sigmoid loss is
    # log 2, plus rpo_alpha (1) x the chosen token-mean NLL, here from transformers' logits in float64.
    ids, attn = batch["chosen_input_ids"][0], batch["chosen_attention_mask"][0]
    mask = batch["chosen_loss_mask"][0]
    tlp = np_token_logps(hf_logits(env["base"], ids, attn), ids)
    nll = -(tlp * mask).sum() / mask.sum()
    assert float(m_lora["loss"]) == pytest.approx(np.log(2.0) + nll, rel=1e-5)
    assert float(m_lora["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)

    # The reference (adapters off) is the base model exactly, also after the adapters moved.
    ref_model = nnx.merge(lora.graphdef, lora.algo.ref_params, lora.rest)
    base = load_hf_model(env["base"])
    np.testing.assert_array_equal(compiled_call(ref_model)(IDS, MASK), compiled_call(base)(IDS, MASK))

    # Only the adapters trained: the merged model differs from the base in the adapted kernels alone.
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    lora.export()
    merged_dir = tmp_path / "merged"
    assert main(["export", "--adapters", str(tmp_path / "lora"), "--merge_lora", "true",
                 "--output_dir", str(merged_dir)]) == 0
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(load_hf_model(merged_dir), nnx.Param))}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    # with B = 0 at step 0 only B moves; A @ B is then non-zero in every adapted kernel
    assert changed == {k for k in before if k[-1] == "kernel"}, sorted(changed)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 32 and cfg["task_type"] == "CAUSAL_LM"
    assert Path(cfg["base_model_name_or_path"]) == Path(env["base"]).absolute()


def test_adapters_start_and_ref_adapters(env, tmp_path):
    """--adapters continues a saved adapter (the policy is base + adapter, the reference the base, so the rewards
    move at step 1); --ref_adapters with the same folder makes the reference equal the policy (rewards 0)."""
    model = load_hf_model(env["base"])
    settings = LoRASettings(rank=8, alpha=32.0, dropout=0.0, init_lora_weights=False)
    add_lora(model, settings, seed=3)
    save_adapter(model, tmp_path / "sft_adapter", settings=settings, base_model=env["base"])
    folder = str(tmp_path / "sft_adapter")
    cont = dpo_trainer(env, tmp_path / "b", tuner_type="lora", adapters=folder)  # its config: dropout 0
    same_ref = dpo_trainer(env, tmp_path / "c", tuner_type="lora", adapters=folder, ref_adapters=folder)
    batch = cont.algo.next_step_batch(cont)
    m_cont, m_same = (jax.device_get(t.train_step(batch)) for t in (cont, same_ref))
    assert abs(float(m_cont["rewards/chosen"])) > 1e-4 and abs(float(m_cont["rewards/rejected"])) > 1e-4
    assert float(m_same["rewards/chosen"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m_same["rewards/rejected"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m_same["logps/chosen"]) == pytest.approx(float(m_cont["logps/chosen"]), rel=1e-6)


# ----- every algorithm, end to end through the CLI ---------------------------------------------------------
def lora_command(kind, env, out, rm_dir=None):
    dataset = {"sft": "sft", "kto": "kto", "grpo": "sft", "ppo": "sft"}.get(kind, "pairs")
    args = ["--model", env["base"], "--dataset", env["files"][dataset], "--output_dir", str(out), "--max_steps", "1",
            "--max_length", "32", "--tuner_type", "lora"]
    if kind == "sft":
        return ["sft", *args]
    extra = {"grpo": ["--reward_funcs", "accuracy", "--max_completion_length", "8"],
             "ppo": ["--reward_model", str(rm_dir), "--max_completion_length", "8"]}.get(kind, [])
    return ["rlhf", "--rlhf_type", kind, *args, *extra]


@pytest.fixture(scope="module")
def reward_model_dir(env):
    """A value-head reward model on the base (PPO's reward model and value-model start)."""
    from transformers import AutoTokenizer

    from jaxalign.convert.value_head_io import save_reward_model
    from jaxalign.models.value_head import RewardModel, ValueHead

    backbone = load_hf_model(env["base"])
    rm = RewardModel(backbone, ValueHead(backbone.config.hidden_size, rngs=nnx.Rngs(3)))
    return save_reward_model(rm, env["root"] / "rm", tokenizer=AutoTokenizer.from_pretrained(env["base"]))


# DPO's path is tested above (step 0, reference, --adapters); CPO, SimPO and ORPO share it without a reference.
@pytest.mark.parametrize("kind", ["sft", "kto", "rm", "grpo", "ppo"])
def test_every_algorithm_trains_lora_and_exports_a_peft_adapter(kind, env, reward_model_dir, tmp_path, capsys):
    out = tmp_path / kind
    rc = main(lora_command(kind, env, out, reward_model_dir))
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert "trainable params:" in captured.out
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    peft_model = peft.PeftModel.from_pretrained(hf_base(env["base"]), str(out)).eval()
    assert np.isfinite(torch_logits(peft_model)).all()
    if kind == "rm":  # the head beside the adapter; merged, a value-head reward model folder
        assert (out / "value_head.safetensors").is_file()
        assert main(["export", "--adapters", str(out), "--merge_lora", "true", "--output_dir", str(tmp_path / "m")]) == 0
        assert (tmp_path / "m" / "value_head.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    if kind == "ppo":
        assert (out / "value_model" / "adapter_model.safetensors").is_file()
        assert (out / "value_model" / "value_head.safetensors").is_file()
    # the checkpoint holds the trainable state only, and exports to the same adapter
    ckpt = out / "checkpoint-1"
    if kind == "sft":  # and a LoRA run resumes from it
        args = lora_command(kind, env, out)
        args[args.index("--max_steps") + 1] = "2"
        assert main([*args, "--resume_from_checkpoint", "latest"]) == 0
        assert (out / "checkpoint-2").is_dir()
        ckpt = out / "checkpoint-2"
    if kind != "ppo":
        assert main(["export", "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "from_ckpt")]) == 0
        a = load_file(str(out / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "from_ckpt" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_infer_with_adapters_equals_the_merged_model(env, peft_adapter, tmp_path, capsys):
    folder = peft_adapter[0]
    merged = tmp_path / "merged"
    assert main(["export", "--adapters", str(folder), "--model", env["base"], "--merge_lora", "true",
                 "--output_dir", str(merged)]) == 0
    capsys.readouterr()
    common = ["infer", "--prompt", "3+4=", "--max_new_tokens", "6", "--temperature", "0"]
    assert main([*common, "--model", env["base"], "--adapters", str(folder)]) == 0
    with_adapter = capsys.readouterr().out
    assert main([*common, "--model", str(merged)]) == 0
    assert with_adapter == capsys.readouterr().out


def test_lora_defaults_as_ms_swift():
    from jaxalign.config import resolve

    lora = resolve("rlhf", None, {"train_type": "lora"})  # ms-swift 3's spelling
    assert lora.tuner_type == "lora" and lora.learning_rate == 1e-4
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (8, 32, 0.05, "all-linear")
    assert resolve("sft", None, {}).learning_rate == 1e-5
    assert resolve("sft", None, {"tuner_type": "lora", "learning_rate": 3e-4}).learning_rate == 3e-4


# ----- bad input: one line, exit 2 ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--lora_rank", "0"], "--lora_rank 0: must be positive"),
    (["--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
    (["--target_modules", "q_proj,attn"], "--target_modules q_proj,attn: 'attn' is not a linear module"),
    (["--ref_model", "X"], "--ref_model cannot be combined with --tuner_type lora"),
])
def test_bad_lora_options_are_one_line_errors(flags, expected, env, tmp_path, capsys):
    rc = main(["rlhf", "--rlhf_type", "dpo", "--model", env["base"], "--dataset", env["files"]["pairs"],
               "--output_dir", str(tmp_path / "o"), "--train_type", "lora", *flags])
    assert rc == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_adapter_that_does_not_fit_the_model_is_one_line_error(env, peft_adapter, tmp_path, capsys):
    other = make_base(tmp_path / "wider", seed=1)
    cfg = json.loads(Path(other, "config.json").read_text())
    cfg["intermediate_size"] = 96
    Path(other, "config.json").write_text(json.dumps(cfg))
    wider = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(other))
    wider.save_pretrained(other)
    capsys.readouterr()
    rc = main(["infer", "--model", other, "--adapters", str(peft_adapter[0]), "--prompt", "1+1="])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "gate_proj.lora_B.weight has shape [64, 4], this model needs [96, 4]" in line
    rc = main(["export", "--adapters", str(peft_adapter[0]), "--output_dir", str(tmp_path / "x")])
    assert rc == 2 and "--merge_lora true" in one_error_line(capsys.readouterr().err)
