"""Sharded loading and forward on 8 simulated CPU devices (see conftest.py), mesh specs, multi-host detection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import BASE, SHARDABLE, assert_state_dicts_identical, hf_row_logits, forward, max_diff_real, padded_batch, save_hf_model_dir
from jaxalign.convert import load_hf_model, save_hf_model
from jaxalign.errors import JaxalignError
from jaxalign.parallel import batch_sharding, is_multi_host_environment, logical_to_spec, make_mesh

# Per mesh: the devices it spans and, per parameter, the expected PartitionSpec and per-device
# shard shape under the default rules (embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor;
# norm replicated). Parameter shapes (hidden 64, 8 heads x 8, 4 kv heads x 8, mlp 128, vocab 128):
#   q_proj.kernel [64, 64] (embed, heads)     k_proj.kernel [64, 32] (embed, kv_heads)
#   down_proj.kernel [128, 64] (mlp, embed)   embed_tokens [128, 64] (vocab, embed)
#   lm_head [64, 128] (embed, vocab)          q_proj.bias [64] (heads)
# "tensor=4" alone names 4 devices: we pass the first 4 of the 8 (a pure tensor-parallel mesh,
# as the spec says) rather than adding data=2, so the tensor axis is checked on its own.
MESHES = {
    "fsdp=8": (
        8,
        {
            "q_proj": (("fsdp", None), (8, 64)),
            "k_proj": (("fsdp", None), (8, 32)),
            "down_proj": ((None, "fsdp"), (128, 8)),
            "embed_tokens": ((None, "fsdp"), (128, 8)),
            "lm_head": (("fsdp", None), (8, 128)),
            "q_bias": ((None,), (64,)),
        },
    ),
    "data=2,fsdp=2,tensor=2": (
        8,
        {
            "q_proj": (("fsdp", "tensor"), (32, 32)),
            "k_proj": (("fsdp", "tensor"), (32, 16)),
            "down_proj": (("tensor", "fsdp"), (64, 32)),
            "embed_tokens": (("tensor", "fsdp"), (64, 32)),
            "lm_head": (("fsdp", "tensor"), (32, 64)),
            "q_bias": (("tensor",), (32,)),
        },
    ),
    "tensor=4": (
        4,
        {
            "q_proj": ((None, "tensor"), (64, 16)),
            "k_proj": ((None, "tensor"), (64, 8)),
            "down_proj": (("tensor", None), (32, 64)),
            "embed_tokens": (("tensor", None), (32, 64)),
            "lm_head": ((None, "tensor"), (64, 32)),
            "q_bias": (("tensor",), (16,)),
        },
    ),
}
TOL = 1e-5
LENGTHS = (10, 7, 3, 10, 1, 5, 8, 2)  # 8 rows: divisible by data x fsdp of every mesh


# Parameters of the stacked (scanned) layers carry a leading, unsharded layers axis.
LAYER_PARAMS = ("q_proj", "k_proj", "down_proj", "q_bias")


def params(model):
    attn = model.layers.self_attn
    return {
        "q_proj": attn.q_proj.kernel[...],
        "k_proj": attn.k_proj.kernel[...],
        "down_proj": model.layers.mlp.down_proj.kernel[...],
        "embed_tokens": model.embed_tokens[...],
        "lm_head": model.lm_head[...],
        "q_bias": attn.q_proj.bias[...],
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Qwen2 (qkv bias, GQA) made untied so lm_head exists; dims divide by 8. And its reference."""
    folder = tmp_path_factory.mktemp("shardable")
    hf = save_hf_model_dir("qwen2", folder, tie_word_embeddings=False, initializer_range=0.2, **SHARDABLE)
    single = load_hf_model(folder)
    ids, mask = padded_batch(LENGTHS, 10, "left", vocab=128)
    ref = np.asarray(forward(single, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_diff_real(ref, hf_row_logits(hf, ids, mask), mask) <= 1e-4  # the reference is right too
    return hf, folder, ids, mask, ref


@pytest.mark.parametrize("spec", list(MESHES))
def test_sharded_load_and_forward(source, spec):
    _, folder, ids, mask, ref = source
    n_devices, expected = MESHES[spec]
    devices = jax.devices()[:n_devices]
    mesh = make_mesh(spec, devices=devices)
    model = load_hf_model(folder, mesh=mesh)

    for name, arr in params(model).items():
        want_spec, want_shard = expected[name]
        if name in LAYER_PARAMS:
            want_spec, want_shard = (None, *want_spec), (BASE["num_hidden_layers"], *want_shard)
        assert tuple(arr.sharding.spec) == want_spec, name
        assert arr.sharding.mesh.shape == mesh.shape, name
        assert set(arr.sharding.device_set) == set(devices), name
        assert {s.data.shape for s in arr.addressable_shards} == {want_shard}, name
    norm = model.layers.input_layernorm.scale[...]
    assert norm.sharding.is_fully_replicated and tuple(norm.sharding.spec) == (None, None)
    assert {s.data.shape for s in norm.addressable_shards} == {(BASE["num_hidden_layers"], 64)}

    batch = batch_sharding(mesh)
    logits = forward(model, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch))
    assert logits.dtype == jnp.float32
    real = mask.astype(bool)
    assert float(np.abs(np.asarray(logits)[real] - ref[real]).max()) <= TOL


def test_sharded_model_saves_bit_identical(source, tmp_path):
    hf, folder, *_ = source
    model = load_hf_model(folder, mesh=make_mesh("data=2,fsdp=2,tensor=2"))
    out = save_hf_model(model, tmp_path / "out", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert_state_dicts_identical(hf.state_dict(), back.state_dict())


def test_mesh_shapes():
    assert dict(make_mesh("fsdp=-1").shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(None).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh("data=2,tensor=-1").shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(make_mesh({"data": 2, "fsdp": 4}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert make_mesh("tensor=4", devices=jax.devices()[:4]).devices.size == 4


@pytest.mark.parametrize(
    "spec, words",
    [
        ("data=2,fsdp=2", ["needs 4 devices", "8"]),  # product != device count
        ("data=3,fsdp=-1", ["do not divide", "8"]),
        ("fsdp", ["AXIS=SIZE"]),
        ("fsdp=two", ["'two'", "not an integer"]),
        ("pipeline=2,fsdp=-1", ["unknown axis", "'pipeline'", "data, fsdp, tensor"]),
        ("data=-1,fsdp=-1", ["at most one axis"]),
        ("data=0,fsdp=-1", ["data=0"]),
    ],
)
def test_bad_mesh_specs(spec, words):
    with pytest.raises(JaxalignError) as err:
        make_mesh(spec)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_indivisible_dimension_is_replicated():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert tuple(logical_to_spec(("vocab", "embed"), (97, 64), mesh)) == (None, "fsdp")  # 97 % 2 != 0
    assert tuple(logical_to_spec(("embed", "mlp"), (64, 128), mesh)) == ("fsdp", "tensor")
    assert tuple(logical_to_spec(("norm",), (64,), mesh)) == (None,)


@pytest.mark.parametrize(
    "env, multi",
    [
        ({}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, True),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM
        ({"SLURM_NTASKS": "4"}, True),
        ({"SLURM_NTASKS": "1"}, False),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"JAX_NUM_PROCESSES": "not-a-number"}, False),
        ({"JAX_COORDINATOR_ADDRESS": ""}, False),
    ],
)
def test_is_multi_host_environment(env, multi):
    assert is_multi_host_environment(env) is multi
