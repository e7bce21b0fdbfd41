"""timm's weights in and out (`nfnets.timm_weights`), without PyTorch.

The timm side comes from tests/data (scripts/timm_fixture.py ran timm
1.0.31): tiny models' logits for seeded weights, timm's full-size
`dm_nfnet_f0` key -> shape list and digests of the other mapped models'
lists, and each model's `pretrained_cfg`.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from typing import NamedTuple
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

import cli_helpers
import model_helpers
import timm_helpers
from nfnets import models
from nfnets import released_weights
from nfnets import timm_mapping
from nfnets import timm_weights
from nfnets import weight_preprocessing
from nfnets.training import checkpoint
from nfnets.training import weights_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# timm's model -> ours, for the logit parity.
PARITY = {"dm_nfnet_f0": "nfnet_f0", "nfnet_l0": "nfnet_l0",
          "eca_nfnet_l0": "eca_nfnet_l0", "nf_resnet50": "nf_resnet50_timm"}


def _write(state, path):
  safetensors_numpy.save_file(dict(state), str(path))
  return str(path)


def _logits(model, params, images, options):
  net = models.build_model(model, num_classes=7, **options)
  return np.asarray(model_helpers.fast_jit(
      lambda p, x: net.apply(p, {}, None, x, is_training=False)[0])(
          params, images))


def _relative_error(ours, theirs):
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _abstract(model, **overrides):
  net = models.build_model(model, **overrides)
  return jax.eval_shape(
      lambda x: net.init(jax.random.PRNGKey(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))[0]


def _assert_trees_equal(a, b):
  assert sorted(a) == sorted(b)
  for module in a:
    assert sorted(a[module]) == sorted(b[module]), module
    for name in a[module]:
      np.testing.assert_array_equal(a[module][name], b[module][name],
                                    strict=True)


@pytest.mark.parametrize("timm_name", list(PARITY))
def test_timm_files_give_timms_logits(timm_name, tmp_path):
  """Every tensor counts: gains ~ 1 + 0.3 z, skip gains too, biases 0.3 z."""
  options, state, images, timm_logits = timm_helpers.tiny_state(timm_name)
  model = PARITY[timm_name]
  path = _write(state, tmp_path / "model.safetensors")
  params = timm_weights.load(path, model, **options)
  if model == "nfnet_f0":
    gains = [v["skip_gain"] for v in params.values() if "skip_gain" in v]
    assert len(gains) == 5 and min(abs(float(g)) for g in gains) > 0.1
  error = _relative_error(_logits(model, params, images, options),
                          timm_logits)
  print(f"{timm_name} as {model}: max |ours - timm| / max |timm| = "
        f"{error:.1e}")
  assert error < 1e-4


def test_timms_stock_dm_nfnet_is_close_to_deepminds_function():
  """timm's own dm_nfnet_f0: exact GELU and WS eps 1e-5 (see timm_mapping)."""
  options, state, images, _ = timm_helpers.tiny_state("dm_nfnet_f0")
  ours = _logits("nfnet_f0", timm_mapping.to_haiku(state), images, options)
  error = _relative_error(ours,
                          timm_helpers.tiny_arrays()["dm_nfnet_f0_stock"])
  print(f"stock timm dm_nfnet_f0 vs DeepMind's function: {error:.1e}")
  assert 1e-3 < error < 5e-2


@pytest.mark.parametrize("timm_name", list(PARITY) + ["nf_seresnet26"])
def test_mapping_round_trips_exactly(timm_name):
  _, state, _, _ = timm_helpers.tiny_state(timm_name)
  params = timm_mapping.to_haiku(state)
  back = timm_mapping.to_timm(params)
  assert list(back) == list(state)  # timm's order too
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key, strict=True)
  _assert_trees_equal(timm_mapping.to_haiku(back), params)


class _RunState(NamedTuple):
  step: jax.Array
  params: dict
  ema_params: dict


def test_project_checkpoint_to_timm_and_back_is_exact(tmp_path):
  _, state, _, _ = timm_helpers.tiny_state("eca_nfnet_l0")
  params = timm_mapping.to_haiku(state)
  ema = jax.tree.map(lambda v: v * 0.5, params)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), 2, async_save=False)
  ckpt.save(3, _RunState(jnp.asarray(3), params, ema), {"batch": 3})
  ckpt.close()
  script = os.path.join(ROOT, "scripts", "convert_weights.py")
  run = lambda *args: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, script, f"--input={tmp_path / 'run'}", *args],
      capture_output=True, text=True, timeout=300, check=False)
  out = tmp_path / "model.npz"  # safetensors, whatever the name says
  result = run(f"--output={out}", "--format=timm")
  assert result.returncode == 0, result.stderr[-2000:]
  assert ("a timm NFNetLight with (1, 2, 1, 1) blocks per stage "
          "(unchecked: no --model)") in result.stdout
  assert timm_weights.detect_format(str(out)) == "safetensors"
  _assert_trees_equal(weights_io.load_weights(str(out))["params"], ema)
  # Errors, from a file (a run's input also logs orbax's lines).
  run = lambda *args: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, script, f"--input={out}", "--format=timm", *args],
      capture_output=True, text=True, timeout=300, check=False)
  cli_helpers.assert_one_line_error(
      run(f"--output={tmp_path / 'full.safetensors'}", "--model=eca_nfnet_l0"),
      f"error: {out} does not fit eca_nfnet_l0 (timm's eca_nfnet_l0): tensor "
      "'stem.conv1.weight' has shape [2, 3, 3, 3], the model needs "
      "[16, 3, 3, 3]")
  cli_helpers.assert_one_line_error(
      run(f"--output={tmp_path / 'x.safetensors'}", "--model=nf_resnet50"),
      "error: model nf_resnet50 has no timm counterpart: timm's nf_resnet50 "
      "is another network, this project's nf_resnet50_timm")


def test_deepmind_released_layout_is_timms_dm_nfnet_f0():
  """The released F0's module listing, mapped: timm's key set and shapes."""
  listing = {}
  with open(os.path.join(ROOT, "tests", "data",
                         "deepmind_nfnet_f0_params.tsv")) as f:
    next(f)
    for line in f:
      module, name, shape = line.rstrip("\n").split("\t")
      listing.setdefault(module, {})[name] = jax.ShapeDtypeStruct(
          json.loads(shape), jnp.float32)
  timm_f0 = {k: tuple(v) for k, v in timm_helpers.fixture()
             ["dm_nfnet_f0"].items()}
  assert timm_mapping.timm_shapes(listing) == timm_f0
  assert timm_weights.expected_shapes("nfnet_f0") == timm_f0


@pytest.mark.parametrize("model", [
    "nfnet_f1", "nfnet_l0", "eca_nfnet_l1", "nf_resnet50_timm",
    "nf_seresnet26", "nf_ecaresnet101"])
def test_exports_have_timms_keys_and_shapes(model):
  """Digests of timm's key -> shape lists (the fixture has every model's)."""
  shapes = timm_mapping.timm_shapes(_abstract(model))
  text = json.dumps(sorted([k, list(s)] for k, s in shapes.items()))
  assert (hashlib.sha256(text.encode()).hexdigest() ==
          timm_helpers.fixture()["state_dict_digests"][
              timm_weights.TIMM_NAMES[model]])


def test_released_file_exports_and_reloads(tmp_path):
  """A released pickle (small F0) -> timm -> back: the same arrays."""
  rng = np.random.default_rng(0)
  params = {m: {n: rng.standard_normal(v.shape).astype(np.float32)
                for n, v in leaves.items()}
            for m, leaves in _abstract("nfnet_f0", width_multiplier=0.125,
                                       group_width=16).items()}
  released = tmp_path / "F0_haiku.npz"
  released_weights.save_released(params, str(released))
  loaded = weights_io.load_weights(str(released))["params"]
  path = tmp_path / "f0.safetensors"
  # Checked against timm's tree of these widths: keys, shapes (0-d skip
  # gains) and order.
  timm_weights.save(loaded, str(path), "nfnet_f0", width_multiplier=0.125,
                    group_width=16)
  state = timm_weights.read_state_dict(str(path))
  assert timm_mapping.identify(state) == "dm_nfnet_f0"
  assert state["stages.0.0.skipinit_gain"].shape == ()
  _assert_trees_equal(weights_io.load_weights(str(path))["params"], params)


def test_a_file_of_another_model_names_the_first_tensor(tmp_path):
  options, state, _, _ = timm_helpers.tiny_state("eca_nfnet_l0")
  path = _write(state, tmp_path / "eca.safetensors")
  with pytest.raises(ValueError) as e:
    timm_weights.load(path, "nfnet_l0", **options)
  message = str(e.value)
  assert "\n" not in message
  assert message == (
      f"{path} does not fit nfnet_l0 (timm's nfnet_l0): tensor "
      "'stages.0.0.attn_last.fc1.weight' is missing (the model needs "
      "[8, 32, 1, 1])")
  # At timm's depths the file's model is named too.
  options, resnet, _, _ = timm_helpers.tiny_state("nf_resnet50")
  path = _write(resnet, tmp_path / "resnet.safetensors")
  with pytest.raises(ValueError) as e:
    weights_io.load_weights(path, "nf_ecaresnet50")
  assert str(e.value) == (
      f"{path} does not fit nf_ecaresnet50 (timm's nf_ecaresnet50): tensor "
      "'stem.conv.weight' has shape [8, 3, 7, 7], the model needs "
      "[64, 3, 7, 7] (it holds timm's nf_resnet50, this project's "
      "nf_resnet50_timm)")
  with pytest.raises(ValueError, match=r"nf_resnet50 has no timm counterpart"
                     r".*\(it holds timm's nf_resnet50, this project's "
                     r"nf_resnet50_timm\)$"):
    weights_io.load_weights(path, "nf_resnet50")
  with pytest.raises(ValueError, match="NF-RegNet"):
    timm_mapping.to_haiku({"stem.conv.weight": np.zeros((8, 3, 3, 3))})


def _torch_zip(path):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    archive.writestr("archive/version", "3\n")
  return str(path)


def test_pth_without_torch_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  for name in ("model.pth", "model.npz"):
    path = _torch_zip(tmp_path / name)
    assert timm_weights.detect_format(path) == "torch"
    with pytest.raises(ValueError) as e:
      weights_io.load_weights(path)
    assert "\n" not in str(e.value)
    assert "torch is not installed: install it (pip install torch), or " \
        "convert the file once where torch is: python " \
        "scripts/convert_weights.py" in str(e.value)


def test_pth_with_torch_reads_the_ema_state_dict(tmp_path, monkeypatch):
  """A stand-in torch: `torch.load` gives tensors (`.detach()...numpy()`)."""
  _, state, _, _ = timm_helpers.tiny_state("nfnet_l0")

  class Tensor:
    def __init__(self, value):
      self.value = value

    def detach(self):
      return self

    def cpu(self):
      return self

    def float(self):
      return self

    def numpy(self):
      return self.value

  class Torch:
    @staticmethod
    def load(path, map_location, weights_only):
      assert map_location == "cpu" and weights_only and path.endswith("pth")
      return {"epoch": 3, "state_dict": {}, "state_dict_ema": {
          f"module.{k}": Tensor(v) for k, v in state.items()}}

  monkeypatch.setitem(sys.modules, "torch", Torch)
  path = _torch_zip(tmp_path / "run.pth")
  np.testing.assert_array_equal(
      timm_weights.read_state_dict(path)["head.fc.weight"],
      state["head.fc.weight"])


def test_formats_are_told_by_content_not_name(tmp_path):
  _, state, _, _ = timm_helpers.tiny_state("eca_nfnet_l0")
  misnamed = _write(state, tmp_path / "weights.npz")
  params = weights_io.load_weights(misnamed)["params"]
  assert "NFNetLight/~/stem/~/conv1" in params
  safe = tmp_path / "safe.safetensors"  # a safe .npz, whatever the name
  released_weights.save_safe(params, str(safe))
  _assert_trees_equal(weights_io.load_weights(str(safe))["params"], params)
  pickled = tmp_path / "pickled.safetensors"
  released_weights.save_released(params, str(pickled))
  assert [timm_weights.detect_format(str(p)) for p in
          (misnamed, safe, pickled)] == ["safetensors", "npz", "pickle"]
  with pytest.raises(ValueError, match="does not exist"):
    timm_weights.detect_format(str(tmp_path / "missing"))


def test_preprocessing_is_timms_pretrained_cfg_and_deepminds():
  for name, cfg in timm_helpers.fixture()["pretrained_cfgs"].items():
    pre = weight_preprocessing.TIMM_PREPROCESSING[name]
    test_size = (cfg["test_input_size"] or cfg["input_size"])[1]
    assert (pre.image_size, pre.test_size) == (cfg["input_size"][1],
                                               test_size), name
    assert (pre.crop, pre.test_crop) == (
        cfg["crop_pct"], cfg["test_crop_pct"] or cfg["crop_pct"]), name
    assert (pre.crop_mode, cfg["interpolation"]) == (cfg["crop_mode"],
                                                     "bicubic"), name
    assert (list(pre.mean), list(pre.std)) == (cfg["mean"], cfg["std"])
    assert (cfg["tag"] or "(no weights)") in pre.source
  deepmind = weight_preprocessing.preprocessing("nfnet_f0", "pickle")
  assert (deepmind.image_size, deepmind.test_size, deepmind.eval_preproc,
          deepmind.interpolation) == (192, 256, "resize_crop_32", "bicubic")
  timm_f0 = weight_preprocessing.preprocessing("nfnet_f0", "safetensors")
  assert timm_f0.eval_preproc == "resize_crop_0.9"
  light = weight_preprocessing.preprocessing("eca_nfnet_l0", "checkpoint")
  assert light.dataset_overrides() == {
      "eval_image_size": 288, "eval_preproc": "crop_resize_1",
      "eval_interpolation": "bicubic_antialias"}
  assert weight_preprocessing.preprocessing("nf_resnet50_timm").test_size \
      == 288


class _Weights(NamedTuple):
  params: dict
  ema_params: dict
  model_state: dict
  ema_model_state: dict


def test_init_from_takes_a_timm_file_with_a_new_head(tmp_path):
  """`--config.init_from=model.safetensors`: the trainer's loading step."""
  from nfnets.training import loop  # pylint: disable=g-import-not-at-top
  options, state, _, _ = timm_helpers.tiny_state("eca_nfnet_l0")
  path = _write(state, tmp_path / "model.safetensors")
  own, _ = model_helpers.init_model("eca_nfnet_l0", num_classes=10, **options)
  fresh = _Weights(own, own, {}, {})
  params, ema, _, _ = loop._load_init_from(  # pylint: disable=protected-access
      path, jax.eval_shape(lambda: fresh), fresh)
  want = timm_mapping.to_haiku(state)
  for module, leaves in params.items():
    for name, value in leaves.items():
      expected = own if module == "NFNetLight/~/linear" else want
      np.testing.assert_array_equal(value, expected[module][name])
      np.testing.assert_array_equal(ema[module][name], value)


def _predict_script():
  """scripts/predict.py as a module (it defines absl flags: load once)."""
  if "predict_script" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "predict_script", os.path.join(ROOT, "scripts", "predict.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["predict_script"] = module
  return sys.modules["predict_script"]


def test_predict_uses_the_weights_preprocessing_unless_overridden(tmp_path):
  predict = _predict_script()
  released = tmp_path / "F0_haiku.npz"
  released.write_bytes(b"\x80\x04}.")  # a pickle: DeepMind's
  _, state, _, _ = timm_helpers.tiny_state("eca_nfnet_l0")
  timm_file = _write(state, tmp_path / "eca.bin")
  pre = predict.settings("nfnet_f0", str(released))
  assert (pre.test_size, pre.test_crop, pre.crop_mode, pre.interpolation) \
      == (256, 32.0, "squash", "bicubic")
  pre = predict.settings("nfnet_f0", timm_file)  # timm's dm_nfnet_f0 cfg
  assert (pre.test_size, pre.test_crop) == (256, 0.9)
  pre = predict.settings("eca_nfnet_l0", timm_file, image_size=64,
                         crop=0.5, mean=["0.5"] * 3)
  assert (pre.test_size, pre.test_crop, pre.crop_mode, pre.mean) == (
      64, 0.5, "center", (0.5, 0.5, 0.5))
  assert predict.describe(pre).startswith(
      "# preprocessing of timm's eca_nfnet_l0.ra2_in1k: --image_size=64 "
      "--crop=0.5 --crop_mode=center --interpolation=bicubic_antialias")
  # A 40 x 20 image whose left half is black and right half white.
  image = predict.Image.fromarray(np.repeat(np.where(
      np.arange(20) < 10, 0, 255).astype(np.uint8)[None, :, None],
                                              40, 0).repeat(3, 2))
  center = predict.prepare(image, dataclasses.replace(
      pre, test_size=8, test_crop=1.0, mean=(0, 0, 0), std=(1, 1, 1)))
  np.testing.assert_allclose(center[:, :3], 0, atol=0.02)
  np.testing.assert_allclose(center[:, -3:], 1, atol=0.02)
  squash = predict.prepare(image, dataclasses.replace(
      pre, test_size=8, test_crop=8.0, crop_mode="squash",
      interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1)))
  assert squash.shape == (8, 8, 3)
  np.testing.assert_allclose(squash[:, :2], 0, atol=0.05)
  np.testing.assert_allclose(squash[:, -2:], 1, atol=0.05)
  with pytest.raises(ValueError, match="--std takes 3 numbers"):
    predict.settings("nfnet_f0", str(released), std=["1"])
