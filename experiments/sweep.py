"""Runs (or prints) a config's sweep: one training run per set of overrides.

  python experiments/sweep.py --config=configs/nfnet.py:sweep=agc_batch \
      --workdir_root=/ckpt/agc [--run] [-- --config.num_epochs=90 ...]

A config file defines the sweep as data: `get_sweep(arg)` returns a list of
`{dotted.config.key: value}` dicts. Each run gets its own workdir under
`--workdir_root`, named after its overrides. Without `--run` the command lines
are printed; with `--run` they are run one after another here, skipping runs
whose workdir says they finished (`done.json`, written by the trainer), and a
failed run does not stop the others. Flags after `--` go to every run.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string("config", None, "Config file[:arg] with a "
                              "get_sweep(arg) function.", required=True)
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "One workdir per "
                                    "run goes under here.", required=True)
_RUN = flags.DEFINE_bool("run", False, "Run the sweep here, one run after "
                         "another, instead of printing the commands.")


def load_sweep(config: str) -> list[dict]:
  """Calls `get_sweep(arg)` of the config file named by `path[:arg]`."""
  path, _, arg = config.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} does not exist")
  sys.path.insert(0, ROOT)  # config files import nfnets and configs
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(); nothing to sweep")
  sweep = module.get_sweep(arg or None)
  if not sweep or not all(isinstance(run, dict) for run in sweep):
    raise ValueError(f"{path}: get_sweep() must return a non-empty list of "
                     "dicts of overrides")
  return sweep


def run_name(overrides: dict) -> str:
  """A workdir name from the overrides: `key=value,key=value`, path-safe."""
  name = ",".join(f"{key}={value}" for key, value in overrides.items())
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name) or "default"


def commands(config: str, sweep: list[dict], workdir_root: str,
             extra: list[str]) -> list[tuple[str, list[str]]]:
  """(workdir, argv) of every run."""
  result = []
  for overrides in sweep:
    workdir = os.path.join(workdir_root, run_name(overrides))
    argv = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
            f"--config={config}", f"--workdir={workdir}"]
    argv += [f"--config.{key}={value}" for key, value in overrides.items()]
    result.append((workdir, argv + extra))
  return result


def main(argv):
  extra = argv[1:]
  try:
    sweep = load_sweep(_CONFIG.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  runs = commands(_CONFIG.value, sweep, os.path.abspath(_WORKDIR_ROOT.value),
                  extra)
  if not _RUN.value:
    for _, command in runs:
      print(shlex.join(command))
    return
  failed = []
  for i, (workdir, command) in enumerate(runs):
    if os.path.exists(os.path.join(workdir, "done.json")):
      print(f"[{i + 1}/{len(runs)}] finished already: {workdir}")
      continue
    print(f"[{i + 1}/{len(runs)}] {shlex.join(command)}", flush=True)
    if subprocess.run(command, check=False).returncode:
      failed.append(workdir)
  if failed:
    raise SystemExit(f"error: {len(failed)} of {len(runs)} runs failed: "
                     f"{', '.join(failed)}")
  print(f"sweep done: {len(runs)} runs under {_WORKDIR_ROOT.value}")


if __name__ == "__main__":
  app.run(main)
