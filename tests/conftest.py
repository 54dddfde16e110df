"""Test session set-up: 8 simulated CPU devices (before jax is imported) and shared fixtures."""

import os

# The tests' tiny models spend their time compiling, not running. XLA's own passes (fusion, layout, sharding) run
# as for users; LLVM optimises the generated CPU code at level 1 instead of 3: the suite takes 14 min instead of 17
# on 2 cores. Level 0 saves more (12 min) but changes float32 rounding enough that three comparisons of two
# compiled programs (sharded vs single device, 2 hosts vs 1, chunked vs xla gradients) miss their tolerances.
# Subprocesses started by the tests inherit both flags; the README's demo and the benchmarks run without them.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags = f"{_flags} {TEST_XLA_FLAGS}"
if "xla_force_host_platform_device_count" not in _flags:  # keep the user's other XLA flags
    _flags = f"{_flags} --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402 - after the device-count flag above
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """float64 jax arrays inside the test (the loss tests compare against formulas in float64)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def char_tokenizer():
    """The embedded character tokenizer (see helpers.ids for its ids)."""
    from helpers import tokenizer

    return tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random-weight Llama folder (with the char tokenizer) shared by tests that only read it."""
    from helpers import make_base

    return make_base(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)
