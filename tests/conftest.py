"""Test-wide JAX setup: 8 fake CPU devices and full-precision fp32 matmuls.

This must run before anything imports jax, which is why it lives in conftest.py.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # after XLA_FLAGS on purpose

jax.config.update("jax_default_matmul_precision", "highest")
