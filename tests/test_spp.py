"""Tests of scripts/spp.py, run as a user runs it (SPPs, ICLR 2021, Sec. 3).

One small run of three ResNet-26 models (width x0.25, 160 px, batch 8, seed
0) is shared by the tests; its numbers are checked against the signal
propagation that the NF-ResNet paper describes (Brock, De, Smith, ICLR 2021,
"Characterizing signal propagation to close the performance gap in
unnormalized ResNets", Sec. 3 and 4).
"""

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import cli_helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "spp.py"
MODELS = ("nf_resnet26", "resnet26", "nf_resnet26_nows")
BLOCKS = 8  # ResNet-26: two blocks in each of four stages
ALPHA = 0.2


def _run(*flags):
  """Runs the script on the CPU and returns the CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=300,
                        check=False)


@pytest.fixture(scope="module")
def spp_run(tmp_path_factory):
  """(PNG path, {model: {column: array}}) of one small SPP run."""
  out = tmp_path_factory.mktemp("spp") / "spp.png"
  result = _run(f"--models={','.join(MODELS)}", "--width_multiplier=0.25",
                "--image_size=160", "--batch_size=8", f"--out={out}")
  assert result.returncode == 0, result.stderr
  assert f"wrote {out} and {out.with_suffix('.csv')}" in result.stdout
  with out.with_suffix(".csv").open(newline="") as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == ["model", "block", "stage", "avg_sq_mean",
                                 "avg_var", "res_var"]
    rows = list(reader)
  table = {}
  for name in MODELS:
    mine = [r for r in rows if r["model"] == name]
    table[name] = {k: np.array([float(r[k]) for r in mine])
                   for k in ("block", "stage", "avg_sq_mean", "avg_var",
                             "res_var")}
  assert len(rows) == len(MODELS) * BLOCKS
  return out, table


def test_png_is_a_real_image(spp_run):
  out, _ = spp_run
  with Image.open(out) as image:
    assert image.format == "PNG"
    assert image.width > 100 and image.height > 100


def test_csv_has_one_row_per_block_per_model(spp_run):
  _, table = spp_run
  for name in MODELS:
    np.testing.assert_array_equal(table[name]["block"], np.arange(BLOCKS))
    np.testing.assert_array_equal(table[name]["stage"],
                                  [0, 0, 1, 1, 2, 2, 3, 3])


def test_nf_resnet_variance_grows_by_alpha_squared_and_resets(spp_run):
  # Block j of a stage outputs the (unit-variance) shortcut plus j + 1
  # branches of variance alpha^2 each; the first block's shortcut is a WS
  # conv of the normalised input, so the count restarts at every stage.
  _, table = spp_run
  variances = table["nf_resnet26"]["avg_var"]
  expected = np.tile(1 + np.arange(1, 3) * ALPHA ** 2, 4)
  np.testing.assert_allclose(variances, expected, rtol=0.15)
  # The reset: each stage's first block is below the last block before it.
  assert all(variances[i] < variances[i - 1] for i in (2, 4, 6)), variances


def test_without_ws_the_mean_shift_grows_with_depth(spp_run):
  # Plain convs on ReLU outputs shift every channel's mean; the shift adds up
  # through the blocks instead of being removed by WS (ICLR 2021, Sec. 4).
  _, table = spp_run
  no_ws = table["nf_resnet26_nows"]["avg_sq_mean"]
  ws = table["nf_resnet26"]["avg_sq_mean"]
  assert no_ws[-1] > 2 * no_ws[0], no_ws
  assert np.all(no_ws > 10 * ws), (no_ws, ws)


def test_batch_norm_keeps_the_variance_in_a_band(spp_run):
  # Measured (seed 0): [1.53 2.22 | 1.40 2.08 | 1.39 2.09 | 1.39 2.08]. BN
  # normalises each branch's input, so a He-initialised branch adds about
  # 0.7 (its res_var) to the variance, and a stage's first block restarts
  # from a conv shortcut of the normalised input (about 0.7 too). With two
  # blocks per stage that gives about 1.4 then 2.1: [1, 3] holds that with
  # margin and no block drifts upwards across stages.
  _, table = spp_run
  bn = table["resnet26"]
  assert np.all((bn["avg_var"] > 1) & (bn["avg_var"] < 3)), bn["avg_var"]
  assert np.all((bn["res_var"] > 0.4) & (bn["res_var"] < 1)), bn["res_var"]
  # Without normalisation or WS the same architecture ends about twice as
  # high (measured 4.17) and its mean shift is 20 times BN's.
  no_ws = table["nf_resnet26_nows"]
  assert no_ws["avg_var"][-1] > 1.5 * bn["avg_var"][-1]
  assert no_ws["avg_sq_mean"][-1] > 10 * bn["avg_sq_mean"].max()


def test_unknown_model_is_a_one_line_error(tmp_path):
  result = _run("--models=nf_resnet26,resnet34", f"--out={tmp_path}/x.png")
  cli_helpers.assert_one_line_error(
      result, "error: unknown model 'resnet34'; valid: ")
  assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flag", ["--batch_size=0", "--batch_size=-1",
                                  "--image_size=0"])
def test_non_positive_sizes_are_a_one_line_error(tmp_path, flag):
  result = _run("--models=nf_resnet26", f"--out={tmp_path}/x.png", flag)
  cli_helpers.assert_one_line_error(
      result, "error: batch_size and image_size must be positive")
  assert not list(tmp_path.iterdir())
