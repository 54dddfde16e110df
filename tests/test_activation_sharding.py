"""True FSDP on 8 simulated CPU devices: activations stay sharded over the batch through the decoder and
the loss, weights are gathered per layer.

* The sharded DPO and SFT steps (fsdp=8; data=2,fsdp=2,tensor=2) equal the single-device step.
* The compiled HLO of a sharded DPO step holds no collective whose result is a global-batch
  activation and no global-batch hidden, MLP or logits array; the logits are per-shard.
* ``constrain`` leaves arrays alone without a mesh context and replicates dimensions the mesh does
  not divide (a batch of one row on eight devices).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxalign.config import resolve
from jaxalign.convert import load_hf_model
from jaxalign.parallel import make_mesh, param_shardings
from jaxalign.parallel.activations import (
    BATCH, EMBED, LENGTH, VOCAB, constrain, context_mesh, gather_weight, mesh_context)
from jaxalign.rollout import generate
from jaxalign.trainers.preference import PairPreference
from jaxalign.trainers.run import build_trainer
from jaxalign.trainers.sft import SFT
from helpers import short_rows, tiny_model_dir, write_jsonl

# Dimensions chosen so that every array in the HLO says what it is: hidden 64, MLP 192, vocab 320,
# 8 heads x 8 (4 kv heads); T = 32 tokens; 8 pairs = 16 sequences = 512 tokens in the global batch,
# 2 sequences (64 tokens) per device under fsdp=8. No parameter has a dimension of 16 or 512.
DIMS = dict(hidden_size=64, intermediate_size=192, num_attention_heads=8, num_key_value_heads=4,
            num_hidden_layers=2, max_position_embeddings=64)
VOCAB_SIZE, T, PAIRS = 320, 32, 8
GLOBAL_SEQS, GLOBAL_TOKENS = 2 * PAIRS, 2 * PAIRS * T
FEATURES = {64, 192, 320}  # hidden, MLP, vocab


def _pairs(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "yes" * (1 + i % 3)}],
             "rejected_response": "no" * (1 + i % 2)} for i in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("actshard")
    untied = tiny_model_dir(root / "untied", seed=3, vocab_size=VOCAB_SIZE, tie_word_embeddings=False, **DIMS)
    tied = tiny_model_dir(root / "tied", seed=4, vocab_size=VOCAB_SIZE, tie_word_embeddings=True, **DIMS)
    pairs = write_jsonl(root / "pairs.jsonl", _pairs(32))
    sft = write_jsonl(root / "sft.jsonl", short_rows(16, seed=5))
    return {"root": root, "untied": untied, "tied": tied, "pairs": pairs, "sft": sft, "n": [0]}


def _trainer(env, kind: str, model: str, mesh: str, per_device: int, **kw):
    env["n"][0] += 1
    flags = dict(model=env[model], output_dir=str(env["root"] / f"out{env['n'][0]}"), mesh=mesh, max_length=T,
                 length_buckets=str(T), gradient_checkpointing=False, gradient_accumulation_steps=1,
                 per_device_train_batch_size=per_device, learning_rate=1e-3, lr_scheduler_type="constant",
                 warmup_ratio=0.0, logging_steps=1, save_steps=10_000, save_hf=False, torch_dtype="float32", seed=0)
    flags.update(kw)
    if kind == "dpo":
        cfg = resolve("rlhf", None, dict(flags, rlhf_type="dpo", dataset=env["pairs"], rpo_alpha=0.5))
        return build_trainer(cfg, PairPreference(cfg), quiet=True)
    cfg = resolve("sft", None, dict(flags, dataset=env["sft"]))
    return build_trainer(cfg, SFT(cfg), quiet=True)


def _one_step(trainer):
    batch = trainer.algo.next_step_batch(trainer)
    metrics = jax.device_get(trainer.train_step(batch))
    return batch, metrics, jax.tree.leaves(jax.device_get(trainer.state.params))


# ----- the sharded step equals the single-device step ------------------------------------------
FSDP8_DPO = ("dpo", "untied", "data=1,fsdp=8,tensor=1", True, {})


@pytest.fixture(scope="module")
def single_device(env):
    """One-device results per (kind, model, flags), shared by the meshes compared against them."""
    cache = {}

    def get(kind, model, flags):
        key = (kind, model, tuple(sorted(flags.items())))
        if key not in cache:
            trainer = _trainer(env, kind, model, "data=1,fsdp=1,tensor=1", PAIRS, **flags)
            cache[key] = (trainer, *_one_step(trainer))
        return cache[key]

    return get


@pytest.mark.parametrize("kind,model,mesh,remat,flags", [
    ("dpo", "untied", "data=1,fsdp=8,tensor=1", True, {}),
    ("dpo", "untied", "data=2,fsdp=2,tensor=2", False, {}),
    ("dpo", "untied", "data=1,fsdp=8,tensor=1", False, {"tuner_type": "lora", "lora_dropout": 0.1}),
    ("sft", "tied", "data=1,fsdp=8,tensor=1", False, {}),
    ("sft", "tied", "data=2,fsdp=2,tensor=2", True, {}),
])
def test_sharded_step_equals_single_device(request, env, single_device, kind, model, mesh, remat, flags):
    one, b1, m1, p1 = single_device(kind, model, flags)
    if (kind, model, mesh, remat, flags) == FSDP8_DPO:  # the trainer whose HLO is inspected below
        many = request.getfixturevalue("fsdp8_dpo")
    else:
        many = _trainer(env, kind, model, mesh, PAIRS // 8 * (2 if "tensor=2" in mesh else 1),
                        gradient_checkpointing=remat, **flags)
    assert one.micro_batch == many.micro_batch == PAIRS and many.mesh.devices.size == 8
    b8, m8, p8 = _one_step(many)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b8[k])
    assert float(m1["grad_norm"]) > 0
    for key in m1:
        np.testing.assert_allclose(float(m8[key]), float(m1[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    assert len(p1) == len(p8)
    for a, b in zip(p1, p8):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    if kind == "dpo":  # policy == reference at step 0, rpo_alpha 0.5: log 2 + 0.5 * the chosen NLL
        assert float(m1["loss"]) > np.log(2.0)


# ----- the compiled program: no global-batch activation ------------------------------------------
_TYPE = re.compile(r"\b(f32|bf16|f16|f64)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\(")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")


def float_results(hlo: str):
    """(op, dtype, dims) for every floating-point array an HLO instruction produces."""
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        for dt, dims in _TYPE.findall(m.group(1)):
            yield m.group(2), dt, tuple(int(d) for d in dims.split(",") if d)


def _squeeze_leading(dims: tuple) -> tuple:
    while len(dims) > 1 and dims[0] == 1:
        dims = dims[1:]
    return dims


def global_batch_activations(hlo: str) -> tuple[list, list]:
    """(collectives whose result is a global-batch activation, any instruction producing a global-batch
    hidden/MLP/vocab array): rank >= 2, leading dimension the global sequences or tokens."""
    collectives, arrays = [], []
    for op, dt, dims in float_results(hlo):
        dims = _squeeze_leading(dims)
        if len(dims) < 2 or dims[0] not in (GLOBAL_SEQS, GLOBAL_TOKENS):
            continue
        if op.startswith(COLLECTIVES):
            collectives.append((op, dt, dims))
        if dims[-1] in FEATURES:
            arrays.append((op, dt, dims))
    return collectives, arrays


@pytest.fixture(scope="module")
def fsdp8_dpo(env):
    return _trainer(env, "dpo", "untied", "data=1,fsdp=8,tensor=1", 1, gradient_checkpointing=True)


@pytest.fixture(scope="module")
def fsdp8_hlo(fsdp8_dpo):
    trainer = fsdp8_dpo
    batch = trainer.algo.next_step_batch(trainer)
    assert batch["chosen_input_ids"].shape == (1, PAIRS, T)
    return trainer.lower_step(batch).compile().as_text()


def test_no_global_batch_activation_in_sharded_dpo_step(fsdp8_hlo):
    collectives, arrays = global_batch_activations(fsdp8_hlo)
    assert not collectives, f"collectives producing global-batch activations: {sorted(set(collectives))[:10]}"
    assert not arrays, f"global-batch activations computed on a device: {sorted(set(arrays))[:10]}"


def test_logits_are_per_shard(fsdp8_hlo):
    shapes = {dims for _, _, dims in float_results(fsdp8_hlo) if dims and dims[-1] == VOCAB_SIZE}
    per_shard = GLOBAL_SEQS // 8
    assert (per_shard, T, VOCAB_SIZE) in shapes or (per_shard * T, VOCAB_SIZE) in shapes, sorted(shapes)
    assert not [s for s in shapes if s[0] in (GLOBAL_SEQS, GLOBAL_TOKENS, GLOBAL_TOKENS - GLOBAL_SEQS)]


def test_weights_are_gathered_not_activations(fsdp8_hlo):
    """Every all-gather carries a weight (or a small per-row vector), none an activation: the MLP's
    [64, 192] kernels are gathered from their [8, 192] shards."""
    # under the layer scan a layer's slice keeps a leading 1 ([1, 64, 192]); drop it
    gathers = [(dt, _squeeze_leading(dims)) for op, dt, dims in float_results(fsdp8_hlo) if op.startswith("all-gather")]
    assert gathers
    assert (("f32", (64, 192)) in gathers) or (("bf16", (64, 192)) in gathers), sorted(set(gathers))
    activations = [g for g in gathers if len(g[1]) >= 2 and g[1][0] in (GLOBAL_SEQS, GLOBAL_TOKENS, T)]
    assert not activations, activations


# ----- constrain(): no mesh, trivial mesh, indivisible dimensions --------------------------------
def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 3, 8))
    assert context_mesh() is None
    jaxpr = jax.make_jaxpr(lambda a: constrain(a, (BATCH, LENGTH, EMBED)))(x)
    assert "sharding_constraint" not in str(jaxpr)
    with mesh_context(make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])):
        assert context_mesh() is None
        assert "sharding_constraint" not in str(jax.make_jaxpr(lambda a: constrain(a, (BATCH, LENGTH, EMBED)))(x))
    w = jnp.ones((8, 16))
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda a: gather_weight(a, ("embed", "mlp")))(w))


def test_constrain_shards_the_batch_and_replicates_what_does_not_divide():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    f = jax.jit(lambda a, b: (constrain(a * 2, (BATCH, LENGTH, VOCAB)), constrain(b * 2, (BATCH, LENGTH, VOCAB))))
    with mesh_context(mesh):
        big, one = f(jnp.ones((8, 3, 10)), jnp.ones((1, 3, 10)))
    assert big.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    assert one.sharding.spec == PartitionSpec(None, None, "tensor")
    assert big.addressable_shards[0].data.shape == (2, 3, 5) and one.addressable_shards[0].data.shape == (1, 3, 5)
    np.testing.assert_array_equal(np.asarray(big), 2.0)


def test_generation_with_one_row_on_eight_devices(env):
    """The sampler traced under an fsdp=8 mesh (constraints active) with a batch of one row, which the mesh
    does not divide and so replicates, gives the unsharded model's greedy tokens and log-probs."""
    model = load_hf_model(env["untied"])
    graphdef, state = nnx.split(model)
    mesh = make_mesh("data=1,fsdp=8,tensor=1")
    sharded = jax.device_put(state, param_shardings(state, mesh))
    ids = np.asarray([[5, 6, 7, 8, 9, 10]], np.int32)
    mask = np.ones_like(ids)
    kw = dict(max_new_tokens=5, temperature=0.0, stop_token_ids=[], pad_token_id=0)
    ref = generate((graphdef, state), ids, mask, **kw)
    with mesh_context(mesh):
        jaxpr = str(jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i))(sharded, ids))
        out = generate((graphdef, sharded), ids, mask, **kw)
    assert "sharding_constraint" in jaxpr
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(ref.logps), atol=1e-5)
