"""Tests of scripts/summary.py, run as a user runs it (F0's size).

F0's size is the one the NFNet paper reports, counted exactly (71.5M
parameters and 12.38 GFLOPs at 256 px in Brock, De, Smith, Simonyan, ICML
2021, "High-Performance Large-Scale Image Recognition Without
Normalization").
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import cli_helpers

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "summary.py"


def _run(*flags):
  """Runs the script on the CPU and returns the CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(SCRIPT), *flags],
                        capture_output=True, text=True, env=env, timeout=300,
                        check=False)


@pytest.mark.parametrize("flags,gmacs,image_size", [
    ((), 12.38, 256),  # default: F0's test resolution
    (("--image_size=192",), 6.98, 192),  # F0's train resolution
])
def test_json_summary_of_nfnet_f0(flags, gmacs, image_size):
  result = _run("--model=nfnet_f0", "--json", *flags)
  assert result.returncode == 0, result.stderr
  info = json.loads(result.stdout)
  assert set(info) == {"model", "params", "gmacs", "image_size"}
  assert info["model"] == "nfnet_f0"
  assert info["params"] == 71_489_284
  assert info["gmacs"] == pytest.approx(gmacs, rel=0.01)
  assert info["image_size"] == image_size


def test_unknown_model_is_a_one_line_error():
  result = _run("--model=resnet34", "--json")
  line = cli_helpers.assert_one_line_error(
      result, "error: unknown model 'resnet34'; valid: ")
  assert "nfnet_f0" in line and "resnet50" in line


def test_negative_num_classes_is_a_one_line_error():
  # 0 is a headless model (the backbone API); below that is an error.
  cli_helpers.assert_one_line_error(
      _run("--num_classes=-3"),
      "error: num_classes must be positive, got -3 (or 0 for a headless")
