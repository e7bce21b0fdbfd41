"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the trainer subprocesses they start) compile the same tiny
# programs: a persistent compilation cache makes each compile happen once.
# Every compile is cached, however short: orbax compiles one small slicing
# program per array shape at a process's first save (~40 ms each, seconds
# in all for a model), which every trainer subprocess would pay again.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"nfnets-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
