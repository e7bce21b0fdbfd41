"""Released DeepMind weights: safe loading, checks, round trips, predict."""

import copyreg
import glob
import json
import os
import pickle
import runpy
import subprocess
import sys

import haiku._src.data_structures as haiku_data_structures
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import cli_helpers
from nfnets import models
from nfnets import released_weights
from nfnets.training import weights_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FlatMapping(dict):
  """Stands for a 2021 Haiku container that today's Haiku no longer has.

  It pickles through copyreg's default reduce with its items in a private
  attribute, as an old class without `__reduce__` did; the loader must read
  it without this class existing.
  """

  def __reduce_ex__(self, protocol):
    return (copyreg._reconstructor,  # pylint: disable=protected-access
            (type(self), object, None), {"_mapping": dict(self)})


FlatMapping.__module__ = "haiku._src.data_structures"


# F0 at 1/8 of its widths, groups of 16 channels: every module path of F0
# (the same blocks and names) at 1/50 of the parameters, for the tests that
# train or evaluate through the trainer. The head is 384 wide (F0: 3072).
SMALL_F0 = dict(width_multiplier=0.125, group_width=16)


def _f0_shapes(num_classes=1000, **overrides):
  model = models.build_model("nfnet_f0", num_classes=num_classes, **overrides)
  params, _ = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  return params


def _random_params(shapes):
  """Random float32 params of `shapes`, gains near 1, small biases."""
  rng = np.random.default_rng(0)
  params = {}
  for module, leaves in shapes.items():
    params[module] = {}
    for name, leaf in leaves.items():
      value = rng.standard_normal(leaf.shape).astype(np.float32)
      if name == "gain":
        value = 1.0 + 0.1 * value
      elif name in ("skip_gain", "bias", "b"):
        value = 0.2 * value
      params[module][name] = value
  return params


def write_released(params, path, monkeypatch):
  """Pickles params as the released files are: old containers, old numpy."""
  monkeypatch.setattr(haiku_data_structures, "FlatMapping", FlatMapping,
                      raising=False)
  tree = FlatMapping({m: FlatMapping(leaves) for m, leaves in params.items()})
  # Protocol 3, as Python 3 wrote by default when the files were made.
  data = pickle.dumps(tree, protocol=3)
  # numpy 1.x (2021) named its array module numpy.core.multiarray.
  data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
  assert b"numpy.core.multiarray" in data and b"FlatMapping" in data
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture(scope="module")
def f0_params():
  """Random params with exactly the F0 listing's paths and shapes."""
  return _random_params(_f0_shapes())


@pytest.fixture(scope="module")
def small_f0_params():
  """Random params of F0's module paths at 1/8 of its widths."""
  return _random_params(_f0_shapes(**SMALL_F0))


def _released_file(params, tmp_path_factory, name):
  path = tmp_path_factory.mktemp("released") / name
  with pytest.MonkeyPatch.context() as monkeypatch:
    write_released(params, path, monkeypatch)
  return str(path)


@pytest.fixture(scope="module")
def small_released_file(small_f0_params, tmp_path_factory):
  return _released_file(small_f0_params, tmp_path_factory,
                        "F0_small_haiku.npz")


@pytest.fixture(scope="module")
def released_file(f0_params, tmp_path_factory):
  return _released_file(f0_params, tmp_path_factory, "F0_haiku.npz")


def _assert_trees_equal(a, b):
  assert sorted(a) == sorted(b)
  for module in a:
    assert sorted(a[module]) == sorted(b[module])
    for name in a[module]:
      np.testing.assert_array_equal(a[module][name], b[module][name])


def test_released_file_loads_and_gives_the_models_logits(f0_params,
                                                        released_file):
  loaded = released_weights.load(released_file)
  _assert_trees_equal(loaded, f0_params)
  released_weights.check_fits(loaded, _f0_shapes(), released_file)
  model = models.build_model("nfnet_f0")
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  apply = jax.jit(lambda p: model.apply(p, {}, None, images,
                                        is_training=False)[0])
  np.testing.assert_array_equal(apply(loaded), apply(f0_params))


def test_export_and_safe_round_trips_are_exact(f0_params, released_file,
                                               tmp_path):
  loaded = released_weights.load(released_file)
  released_weights.save_released(loaded, tmp_path / "export_haiku.npz")
  _assert_trees_equal(released_weights.load(tmp_path / "export_haiku.npz"),
                      f0_params)
  # Other ports read exports as they read DeepMind's files.
  with open(tmp_path / "export_haiku.npz", "rb") as f:
    _assert_trees_equal(pickle.load(f), f0_params)
  released_weights.save_safe(loaded, tmp_path / "safe.npz")
  with np.load(tmp_path / "safe.npz", allow_pickle=False) as npz:
    assert "NFNet/~/nf_block_3/~/conv1b:w" in npz.files
  _assert_trees_equal(released_weights.load(tmp_path / "safe.npz"), f0_params)


def test_wrong_variant_names_the_first_mismatched_module(released_file):
  f1 = models.build_model("nfnet_f1")
  f1_shapes, _ = jax.eval_shape(
      lambda x: f1.init(jax.random.PRNGKey(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"does not fit the model: module "
                     r"'NFNet/~/nf_block_1' has \{'skip_gain'.*nothing|"
                     r"does not fit the model: module 'NFNet/~/nf_block"):
    released_weights.check_fits(released_weights.load(released_file),
                                f1_shapes, released_file)


class _Exploit:

  def __reduce__(self):
    return (os.system, ("touch /tmp/nfnets-pickle-exploit-ran",))


def test_code_in_a_pickle_is_refused_not_run(tmp_path):
  marker = "/tmp/nfnets-pickle-exploit-ran"
  if os.path.exists(marker):
    os.remove(marker)
  path = tmp_path / "evil.npz"
  path.write_bytes(pickle.dumps({"NFNet/~/linear": {"w": _Exploit()}}))
  with pytest.raises(ValueError, match=r"refusing to unpickle "
                     r"(posix|os)\.system"):
    released_weights.load(str(path))
  assert not os.path.exists(marker)


_DILL_DIR = os.path.join(ROOT, "tests", "data")
_DILL_FILES = sorted(glob.glob(os.path.join(_DILL_DIR, "dill-*.pkl")))


@pytest.mark.parametrize("path", _DILL_FILES, ids=os.path.basename)
def test_pickles_written_by_dill_load_exactly(path):
  """dill 0.3.3 (as in 2021: numpy reached through dill's helpers) and 0.4.1."""
  assert len(_DILL_FILES) == 4
  expected = runpy.run_path(os.path.join(
      _DILL_DIR, "make_dill_pickles.py"))["params_tree"]()
  loaded = released_weights.load(path)
  _assert_trees_equal(loaded, expected)
  for module, leaves in expected.items():
    for name, value in leaves.items():
      assert loaded[module][name].dtype == value.dtype
      assert loaded[module][name].shape == np.shape(value)


def test_dill_helpers_reach_only_numpy_array_constructors(tmp_path):
  # dill._dill._get_attr(dill._dill._import_module('os'), 'system'), protocol 2.
  os_system = (b"\x80\x02cdill._dill\n_get_attr\ncdill._dill\n_import_module\n"
               b"X\x02\x00\x00\x00os\x85RX\x06\x00\x00\x00system\x86R.")
  (tmp_path / "os.pkl").write_bytes(os_system)
  with pytest.raises(ValueError, match="refusing to import os"):
    released_weights.load(str(tmp_path / "os.pkl"))
  # The same from numpy's array module: a name other than its constructors.
  umath = b"numpy.core._multiarray_umath"
  getattr_of_numpy = os_system.replace(
      b"X\x02\x00\x00\x00os", b"X" + len(umath).to_bytes(4, "little") + umath)
  (tmp_path / "np.pkl").write_bytes(getattr_of_numpy)
  with pytest.raises(ValueError, match="refusing to unpickle "
                     "numpy.core._multiarray_umath.system"):
    released_weights.load(str(tmp_path / "np.pkl"))


def test_convert_weights_script_writes_a_safe_file_and_refuses_bad_outputs(
    tmp_path):
  source = os.path.join(_DILL_DIR, "dill-0.3.3_numpy-1.26_protocol3.pkl")
  convert = lambda output: subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"),
       f"--input={source}", f"--output={output}"], capture_output=True,
      text=True, timeout=300, check=False)
  out = tmp_path / "safe.npz"
  result = convert(out)
  assert result.returncode == 0, result.stderr[-2000:]
  _assert_trees_equal(released_weights.load(str(out)),
                      released_weights.load(source))
  cli_helpers.assert_one_line_error(
      convert(out), f"error: {out} exists; not overwriting it")
  cli_helpers.assert_one_line_error(
      convert(tmp_path / "no" / "safe.npz"),
      "error: [Errno 2] No such file or directory")


def test_truncated_foreign_and_missing_files_are_clear_errors(
    released_file, tmp_path):
  data = open(released_file, "rb").read()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated or not a params pickle"):
    released_weights.load(str(tmp_path / "cut.npz"))
  (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
  with pytest.raises(ValueError, match="not a params tree"):
    released_weights.load(str(tmp_path / "list.pkl"))
  (tmp_path / "text.npz").write_text("hello")
  with pytest.raises(ValueError, match="truncated or not a params pickle"):
    released_weights.load(str(tmp_path / "text.npz"))
  with pytest.raises(ValueError, match="does not exist"):
    released_weights.load(str(tmp_path / "nope.npz"))


def test_load_weights_dispatches_files_and_runs(released_file):
  loaded = weights_io.load_weights(released_file)
  assert loaded["params"] is loaded["ema_params"]
  with pytest.raises(ValueError, match="no checkpoint found"):
    weights_io.load_weights(os.path.dirname(released_file))


def test_predict_script_on_generated_images(released_file, tmp_path):
  rng = np.random.default_rng(0)
  paths = []
  for i, mode in enumerate(["RGB", "L", "RGB"]):
    pixels = rng.integers(0, 255, (90 + 10 * i, 70, 3), np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path = tmp_path / f"image{i}.{'png' if i == 2 else 'jpg'}"
    image.save(path)
    paths.append(str(path))
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "predict.py"),
         "--model=nfnet_f0", f"--weights={released_file}",
         "--image_size=64"]
  result = subprocess.run(cmd + ["--json"] + paths, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [line["image"] for line in lines] == paths
  for line in lines:
    top5 = line["top5"]
    assert len(top5) == 5
    probs = [entry["prob"] for entry in top5]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(0 <= entry["class"] < 1000 and entry["label"]
               for entry in top5)
  text = subprocess.run(cmd + paths[:1], capture_output=True, text=True,
                        timeout=300, check=False)
  assert text.returncode == 0 and "%" in text.stdout
  missing = subprocess.run(cmd + [str(tmp_path / "missing.jpg")],
                           capture_output=True, text=True, timeout=300,
                           check=False)
  assert missing.returncode != 0
  assert "error: cannot read image" in missing.stderr
  for flag in ("--top_k=0", "--image_size=0"):
    bad = subprocess.run(cmd + [flag] + paths[:1], capture_output=True,
                         text=True, timeout=300, check=False)
    cli_helpers.assert_one_line_error(
        bad, "error: top_k and image_size must be positive")


# Fine-tuning from a released file with a new head:
# tests/test_finetune.py's test_finetune_config_runs_end_to_end.


def test_evaluate_released_f0_on_a_local_imagenet(small_f0_params,
                                                  small_released_file,
                                                  tmp_path):
  """--mode=eval with init_from: the trainer's figures equal a PIL + apply."""
  pytest.importorskip("tensorflow_datasets")
  # pylint: disable=g-import-not-at-top
  import io
  import fake_imagenet
  from configs import nfnet
  from nfnets.training import loop
  from nfnets.data.tfds import source as tfds_source
  from nfnets.data import transforms
  # pylint: enable=g-import-not-at-top
  manual_dir, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  fake_imagenet.write_fake_imagenet(manual_dir)
  config = nfnet.get_config("variant=F0")
  config.init_from = small_released_file
  config.model.kwargs = dict(config.model.kwargs, **SMALL_F0)
  config.dataset.update(dict(data_dir=data_dir, manual_dir=manual_dir,
                             image_size=32, eval_image_size=64))
  config.update(dict(batch_size=8, eval_batch_size=8, precision="float32"))
  # Evaluation never opens the training split.
  config.dataset.train_split = "no_such_split"
  results = loop.train_and_evaluate(config, str(tmp_path / "run"), "eval")
  # Independently: PIL's resize_crop_32 of each stored image, then the model.
  source = tfds_source.load("imagenet2012", "validation", data_dir=data_dir)
  encoded, labels = source.read(np.arange(source.num_examples))
  images = np.stack([transforms.resize_crop_32(
      Image.open(io.BytesIO(e)).convert("RGB"), 64) for e in encoded])
  model = models.build_model("nfnet_f0", **SMALL_F0)
  logits, _ = jax.jit(lambda p, x: model.apply(p, {}, None, x,
                                               is_training=False))(
                                                   small_f0_params, images)
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True))
                              .sum(-1, keepdims=True)) - logits.max(
                                  -1, keepdims=True)
  loss = -np.mean(log_probs[np.arange(len(labels)), labels])
  top5 = np.argsort(-logits, -1)[:, :5]
  assert results["eval_examples"] == len(labels)
  for prefix in ("", "ema_"):  # Both weights are the file's.
    # TF and PIL resizes differ by at most one grey level per pixel.
    np.testing.assert_allclose(results[f"eval_{prefix}loss"], loss, rtol=2e-3)
    assert results[f"eval_{prefix}top1"] == np.mean(top5[:, 0] == labels)
    assert results[f"eval_{prefix}top5"] == np.mean(
        np.any(top5 == labels[:, None], -1))
