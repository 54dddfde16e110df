"""`jaxalign plan` on the suite's 8 simulated CPU devices (`--topology cpu:8`): the compiled train step's
(and GRPO's sampler's) per-device memory against bytes worked out here from the model's shapes, the mesh
and the batch; XLA's FLOPs against the model-FLOPs count; and the one-line errors of bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from jaxalign.cli import main
from helpers import one_error_line

DEVICES = 8  # conftest.py: --xla_force_host_platform_device_count=8
F32 = 4
# Bytes of an optimizer step's bookkeeping: the step counter (int32) and the rng key data (uint32[2]) of the
# TrainState, and the two int32 counts of AdamW's state (Adam's moments and the learning-rate schedule).
SCALARS = 4 + 8 + 2 * 4
# jit drops arguments the program never reads (e.g. DPO's unused "margin"), a few bytes per device.
SLACK = 64


def plan(capsys, *args: str) -> dict:
    capsys.readouterr()
    rc = main(["plan", "--topology", f"cpu:{DEVICES}", "--json", *args])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


def param_bytes_per_device(folder: str, layers: int) -> int:
    """float32 params of the Llama in ``folder`` (with ``layers`` layers) on one device of an fsdp=8 mesh,
    from config.json alone: every matrix is split 8 ways over its hidden-size dimension (the fsdp rule
    for the "embed" axis; every dimension of the tiny model divides 8 where it must), the RMSNorm scales
    are replicated."""
    c = json.loads((Path(folder) / "config.json").read_text())
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    assert h % DEVICES == 0
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    matrices = v * h * (1 if c["tie_word_embeddings"] else 2) + layers * per_layer
    norms = layers * 2 * h + h
    return F32 * (matrices // DEVICES + norms)


def check_totals(p: dict) -> None:
    """XLA's definition: total = arguments + outputs - aliased + temporaries; peak adds the non-arguments."""
    for key in ("arguments", "outputs", "temporaries", "total", "peak"):
        assert p[key] > 0, (key, p)
    assert p["total"] == p["arguments"] + p["outputs"] - p["aliased"] + p["temporaries"]
    assert p["peak"] == p["total"] + sum(p["resident_elsewhere"].values())
    assert p["flops"] > 0 and p["model_flops"] > 0


def check_train_flops(p: dict) -> None:
    # XLA's per-device count times the devices covers the model FLOPs (forward, backward, reference) plus
    # what they leave out (rematerialised forwards, softmax, the optimizer), but not twice over.
    assert 1.0 <= p["flops_all_devices"] / p["model_flops"] <= 2.0, p


def test_plan_sft(capsys, tiny_model_dir):
    config_json = str(Path(tiny_model_dir) / "config.json")  # a bare config.json does (no weights are read)
    r = plan(capsys, "--rlhf_type", "sft", "--model", config_json, "--num_layers", "1", "--max_length", "64",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
             "--gradient_checkpointing", "false")
    assert (r["rlhf_type"], r["layers"], r["devices"], r["mesh"]) == ("sft", 1, 8, {"data": 1, "fsdp": 8, "tensor": 1})
    assert r["fits"] is None and r["chip"] is None  # no HBM or peak figure for CPU devices
    (step,) = r["programs"]
    check_totals(step)
    check_train_flops(step)
    params = param_bytes_per_device(tiny_model_dir, 1)
    batch = 3 * 2 * 64 * F32  # input_ids, attention_mask, loss_mask: 2 rows of 64 per device
    expected = 3 * params + SCALARS + batch  # params and Adam's two moments
    assert step["argument_parts"]["params"] == params
    assert abs(step["arguments"] - expected) <= SLACK, (step["arguments"], expected)


def test_plan_dpo(capsys, tiny_model_dir):
    r = plan(capsys, "--rlhf_type", "dpo", "--model", tiny_model_dir, "--max_length", "64",
             "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2")
    (step,) = r["programs"]
    check_totals(step)
    check_train_flops(step)
    params = param_bytes_per_device(tiny_model_dir, 2)
    batch = 2 * 3 * 2 * 64 * F32  # chosen and rejected ids/masks: 2 micro-batches x 1 row of 64 per device
    expected = 4 * params + SCALARS + batch  # params, Adam's moments, the float32 reference copy
    assert step["argument_parts"]["reference"] == params
    assert abs(step["arguments"] - expected) <= SLACK, (step["arguments"], expected)
    # The step donates its state: the new params and moments reuse the old ones' buffers.
    assert step["aliased"] >= 3 * params


def test_plan_grpo_update_and_sampler(capsys, tiny_model_dir):
    from jaxalign.plan.report import format_report

    r = plan(capsys, "--rlhf_type", "grpo", "--model", tiny_model_dir, "--num_layers", "1", "--max_length", "32",
             "--max_completion_length", "16", "--num_generations", "4", "--per_device_train_batch_size", "4",
             "--gradient_checkpointing", "false")
    step, sampler = r["programs"]
    assert (step["program"], sampler["program"]) == ("train step", "sampler")
    for p in (step, sampler):
        check_totals(p)
    check_train_flops(step)
    params = param_bytes_per_device(tiny_model_dir, 1)
    # Per device one row holding the 32-token prompt once and its 4 completions of 16 sampled tokens (the
    # shared-prefix layout, the default): ids and attention mask [32 + 4 x 16]; per completion the completion
    # mask and old log-probs [16] and the advantage.
    batch = (2 * (32 + 4 * 16) + 4 * (2 * 16 + 1)) * F32
    expected = 4 * params + SCALARS + batch  # beta 0.04: the float32 reference beside params and moments
    assert abs(step["arguments"] - expected) <= SLACK, (step["arguments"], expected)
    # The sampler: 8 prompts x 4 completions = the 32-row generation; one prompt of 32 tokens per device,
    # its ids and mask, a row of stop ids, the rng key, and the policy's float32 params.
    prompts = 2 * 32 * F32
    assert 0 <= sampler["arguments"] - (params + prompts + 8) <= 4 * F32, sampler["arguments"]
    # While it samples, the optimizer state and the reference stay on the devices.
    assert sampler["resident_elsewhere"] == {"rest of the train state": 2 * params + SCALARS, "reference": params}
    text = format_report(r)
    assert "\ntrain step (" in text and "\nsampler (" in text and "1 layers" in text, text


def test_loop_flops_counts_loop_bodies_at_their_trip_counts():
    """XLA's cost analysis counts a scan's body once; loop_flops multiplies it by the trip count (nested too)."""
    import jax.numpy as jnp

    from jaxalign.plan.hlo_flops import loop_flops

    def f(ws, x):
        def layer(x, w):  # 3 matmuls by w per outer step
            return jax.lax.scan(lambda y, _: (jnp.tanh(y @ w), None), x, None, length=3)[0], None

        return jax.lax.scan(layer, x, ws)[0].sum()

    ws, x = jax.ShapeDtypeStruct((4, 32, 32), jnp.float32), jax.ShapeDtypeStruct((8, 32), jnp.float32)
    compiled = jax.jit(f).lower(ws, x).compile()
    once, looped = loop_flops(compiled.as_text())
    matmul = 2 * 8 * 32 * 32
    # The 11 iterations XLA's figure leaves out: their matmuls, plus the loop counters' few adds and compares.
    assert 0 <= (looped - once) - (4 * 3 - 1) * matmul <= 64
    assert abs(once - compiled.cost_analysis()["flops"]) <= 0.01 * once  # once: XLA's own count


def test_bad_topology_name(capsys, tiny_model_dir):
    for name in ("v5e-4x4", "cpu:0", "tpu"):
        capsys.readouterr()
        rc = main(["plan", "--topology", name, "--model", tiny_model_dir])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and name in line and ("v5p:2x2x4" in line or "cpu:8" in line), line


def test_missing_model(capsys, tmp_path):
    capsys.readouterr()
    rc = main(["plan", "--topology", "cpu:8", "--model", str(tmp_path / "nowhere")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "nowhere" in line and "config.json" in line


def test_more_cpu_devices_than_started(capsys, tiny_model_dir):
    jax.devices()  # the backend is running with 8 devices; 16 cannot be added in this process
    capsys.readouterr()
    rc = main(["plan", "--topology", "cpu:16", "--model", tiny_model_dir])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "cpu:16" in line and "fresh process" in line


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_tpu_topology_without_libtpu(capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")  # what plan sets for libtpu is undone after the test
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    capsys.readouterr()
    rc = main(["plan", "--topology", "v5e:4x4", "--model", tiny_model_dir])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "v5e:4x4" in line and 'pip install "jax[tpu]"' in line
