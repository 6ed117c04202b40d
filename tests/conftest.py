"""Test configuration: 8 fake CPU devices for the multi-device tests.

XLA reads the flag when JAX initializes its backend, so it is set here,
before any test module imports JAX.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
