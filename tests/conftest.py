"""Test setup: CPU only, 8 fake devices for sharding tests (must precede any jax import)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the `m3jax` command's persistent compilation cache stays off in tests (no writes to ~/.cache;
# tests/test_cli.py checks the cache in subprocesses with their own directories)
os.environ.setdefault("M3JAX_COMPILE_CACHE", "off")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
