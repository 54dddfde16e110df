"""The sampler on 8 simulated CPU devices gives the same greedy tokens as on one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from helpers import save_hf_model_dir
from jaxalign.convert import load_hf_model
from jaxalign.errors import ShardingError
from jaxalign.parallel import make_mesh
from jaxalign.rollout import generate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_mesh")
    save_hf_model_dir("llama", path, seed=4)
    return path


def prompts():
    rng = np.random.default_rng(1)
    lengths = [3, 7, 5, 1, 6, 2, 7, 4]
    ids = np.zeros((8, 7), np.int32)
    mask = np.zeros((8, 7), np.int32)
    for i, n in enumerate(lengths):
        ids[i, 7 - n:] = rng.integers(3, 97, n)
        mask[i, 7 - n:] = 1
    return ids, mask


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_mesh_greedy_equals_single_device(model_dir):
    ids, mask = prompts()
    kw = dict(max_new_tokens=8, temperature=0.0, stop_token_ids=(), rng=0)
    single = generate(load_hf_model(model_dir), ids, mask, **kw)
    ref = np.asarray(single.tokens)
    assert len({tuple(r) for r in ref}) > 4  # rows differ
    for spec in ("data=2,fsdp=2,tensor=2", "data=1,fsdp=8,tensor=1"):
        mesh = make_mesh(spec)
        model = load_hf_model(model_dir, mesh=mesh)
        out = generate(model, ids, mask, mesh=mesh, **kw)
        assert out.tokens.sharding.spec[0] in (("data", "fsdp"), "fsdp"), out.tokens.sharding
        np.testing.assert_array_equal(np.asarray(out.tokens), ref, err_msg=spec)
        np.testing.assert_allclose(np.asarray(out.logps), np.asarray(single.logps), atol=1e-4)
    with pytest.raises(ShardingError, match="multiple of 8"):
        generate(model, ids[:4], mask[:4], mesh=mesh, **kw)
