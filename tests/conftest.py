"""Test session set-up: 8 simulated CPU devices (before jax is imported) and shared fixtures."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:  # keep the user's other XLA flags
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
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
