"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

# LLVM's optimisation level 0 for the CPU code XLA generates: about a third
# less compile time, which is most of the suite's time; the tiny test models
# run a few steps each, so their slower code costs less than it saves. (XLA's
# own HLO passes, fusion included, run as usual.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0").strip()
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


# The modules that take longest, longest first (their test times summed, in
# the suite of 2026-12-03). `python -m pytest -n 2 --dist loadfile` (the
# README's test command) hands each worker whole modules in collection order
# (pytest.ini turns off xdist's reordering by test count): starting the long
# ones first keeps one worker from running the last long module alone while
# the other idles.
_SLOW_MODULES = ("test_multihost.py", "test_train_loop.py",
                 "test_backbones.py", "test_finetune.py",
                 "test_benchmark_cli.py",
                 "test_train.py", "test_recipe.py", "test_released_weights.py",
                 "test_model_numerics.py", "test_train_cli.py",
                 "test_sweep.py", "test_recipe_optimizer.py",
                 "test_image_folder.py", "test_models.py", "test_tfds.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _SLOW_MODULES.index(name) if name in _SLOW_MODULES else len(
        _SLOW_MODULES)
  items.sort(key=rank)  # stable: the order within a module is kept
