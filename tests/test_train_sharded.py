"""Sharded training on 8 simulated CPU devices (fsdp=4, tensor=2) gives the losses and weights of
one device, for the same global batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxalign.trainers.run import build_trainer
from jaxalign.trainers.sft import SFT
from helpers import long_rows, make_base, sft_config, short_rows, write_jsonl

STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    base = make_base(root / "base", seed=6)
    data = write_jsonl(root / "train.jsonl", short_rows(8, seed=8) + long_rows(8, seed=9))
    return root, base, data


def run(setup, name, mesh, per_device):
    root, base, data = setup
    cfg = sft_config(model=base, dataset=data, output_dir=str(root / name), mesh=mesh, max_steps=STEPS,
                     per_device_train_batch_size=per_device, gradient_accumulation_steps=2, learning_rate=3e-3,
                     weight_decay=0.1)
    trainer = build_trainer(cfg, SFT(cfg), quiet=True)
    history = trainer.train()
    return trainer, [r for r in history if "loss" in r]


@pytest.fixture(scope="module")
def single(setup):
    return run(setup, "one", "data=1,fsdp=1,tensor=1", 4)


@pytest.fixture(scope="module")
def sharded(setup):
    return run(setup, "eight", "data=1,fsdp=4,tensor=2", 1)


def test_meshes_are_what_they_say(single, sharded):
    t1, t8 = single[0], sharded[0]
    assert t1.mesh.devices.size == 1 and dict(t8.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert t1.micro_batch == t8.micro_batch == 4  # the same global batch
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(t8.state.params)}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
    params = jax.tree.leaves(t8.state.params)
    big = max(params, key=lambda x: x.size)
    assert len(big.sharding.device_set) == 8 and big.addressable_shards[0].data.size == big.size // 8
    # Adam's moments are sharded like their parameters; the rest of the state is on the same mesh.
    moments = [x for x in jax.tree.leaves(t8.state.opt_state) if x.shape == big.shape]
    assert len(moments) >= 2 and all(m.sharding == big.sharding for m in moments)
    assert all(x.sharding.mesh == t8.mesh for x in jax.tree.leaves(t8.state))


def test_sharded_losses_equal_single_device(single, sharded):
    h1, h8 = single[1], sharded[1]
    assert [r["step"] for r in h1] == [r["step"] for r in h8] == list(range(1, STEPS + 1))
    for r1, r8 in zip(h1, h8):
        for key in ("loss", "grad_norm", "token_acc", "learning_rate"):
            np.testing.assert_allclose(r8[key], r1[key], rtol=2e-5, err_msg=f"step {r1['step']} {key}")
    assert h1[-1]["loss"] < h1[0]["loss"]


def test_sharded_weights_equal_single_device(single, sharded):
    w1 = jax.tree.leaves(jax.device_get(single[0].state.params))
    w8 = jax.tree.leaves(jax.device_get(sharded[0].state.params))
    for a, b in zip(w1, w8):
        np.testing.assert_allclose(b, a, atol=2e-5)
