"""Tests of the TensorFlow RandAugment ops against PIL and numpy references."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest

tf = pytest.importorskip("tensorflow")

# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data import randaugment

H, W = 40, 48  # Non-square, so that height and width mix-ups show.


def _noise(seed: int, lo: int = 30, hi: int = 220, shape=(H, W, 3)):
  """uint8 noise in [lo, hi): leaves AutoContrast and Equalize work to do."""
  return np.random.default_rng(seed).integers(lo, hi, shape).astype(np.uint8)


def _gradient(shape=(H, W, 3)) -> np.ndarray:
  """Smooth ramps, a different direction per channel."""
  y, x = np.mgrid[:shape[0], :shape[1]]
  ramps = [40 + 3 * x, 250 - 4 * y, 90 + 2 * x + y]
  return np.stack(ramps, -1).astype(np.uint8)


IMAGES = {"noise": _noise(0), "gradient": _gradient()}


def _seed(i: int):
  return tf.constant([7, i], tf.int64)


def _op(image, name, magnitude, seed=0) -> np.ndarray:
  return randaugment.apply_op(image, name, magnitude, _seed(seed)).numpy()


def test_import_does_not_load_tensorflow():
  path = os.path.join(os.path.dirname(__file__), "..", "nfnets", "data",
                      "randaugment.py")
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('ra', {path!r})\n"
          "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
          "assert 'tensorflow' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("image_name", sorted(IMAGES))
@pytest.mark.parametrize("name,magnitude,reference", [
    ("Invert", 5, ImageOps.invert),
    ("AutoContrast", 5, ImageOps.autocontrast),
    ("Equalize", 5, ImageOps.equalize),
    # Solarize inverts from int(256 m / 10) up: m=0 inverts all, m=10 nothing.
    ("Solarize", 0, lambda im: ImageOps.solarize(im, 0)),
    ("Solarize", 3, lambda im: ImageOps.solarize(im, 76)),
    ("Solarize", 5, lambda im: ImageOps.solarize(im, 128)),
    ("Solarize", 15, lambda im: im),
    # Posterize keeps int(4 m / 10) bits (the reference mapping).
    ("Posterize", 0, lambda im: Image.new("RGB", im.size)),  # 0 bits: black.
    ("Posterize", 5, lambda im: ImageOps.posterize(im, 2)),
    ("Posterize", 10, lambda im: ImageOps.posterize(im, 4)),
    ("Posterize", 15, lambda im: ImageOps.posterize(im, 6)),
])
def test_ops_match_pil_image_ops(image_name, name, magnitude, reference):
  image = IMAGES[image_name]
  expected = np.asarray(reference(Image.fromarray(image)))
  np.testing.assert_array_equal(_op(image, name, magnitude), expected)


def test_autocontrast_and_equalize_edge_cases():
  flat = np.full((H, W, 3), 77, np.uint8)  # hi == lo: both leave it alone.
  two = np.where(_noise(1) < 120, 10, 200).astype(np.uint8)  # Two levels.
  for image in (flat, two, _noise(2, 0, 256)):
    pil = Image.fromarray(image)
    np.testing.assert_array_equal(_op(image, "AutoContrast", 5),
                                  np.asarray(ImageOps.autocontrast(pil)))
    np.testing.assert_array_equal(_op(image, "Equalize", 5),
                                  np.asarray(ImageOps.equalize(pil)))


@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness",
                                  "Sharpness"])
@pytest.mark.parametrize("magnitude", [0, 3, 7, 15])
def test_enhance_ops_match_pil_image_enhance(name, magnitude):
  factor = 0.1 + 1.8 * magnitude / 10  # The reference enhance mapping.
  for image in IMAGES.values():
    expected = getattr(ImageEnhance, name)(Image.fromarray(image))
    expected = np.asarray(expected.enhance(factor), np.int32)
    got = _op(image, name, magnitude).astype(np.int32)
    # Bit-exact: PIL's integer RGB->L luma, its rounded mean, and its float32
    # blend truncated to uint8 are reproduced. Pillow's 3x3 SMOOTH filter
    # uses fixed-point weights whose rounding has changed between versions,
    # so Sharpness is allowed 1 level on a few pixels (exact on Pillow 13).
    if name == "Sharpness":
      np.testing.assert_allclose(got, expected, atol=1)
      assert np.mean(got != expected) < 0.01
    else:
      np.testing.assert_array_equal(got, expected)


def test_solarize_add():
  image = IMAGES["gradient"].astype(np.int32)
  added = np.minimum(image + int(110 * 0.7), 255)  # Magnitude 7: +77.
  expected = np.where(image < 128, added, image)
  np.testing.assert_array_equal(_op(IMAGES["gradient"], "SolarizeAdd", 7),
                                expected)


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX",
                                  "TranslateY"])
def test_geometric_ops_at_magnitude_zero_are_identity(name):
  np.testing.assert_array_equal(_op(IMAGES["noise"], name, 0), IMAGES["noise"])


def test_rotate_by_90_degrees_either_way():
  image = _noise(3, shape=(H, H, 3))
  turns = set()
  for i in range(8):  # Magnitude 30 is 3 * 30 = 90 degrees, random sign.
    out = _op(image, "Rotate", 30, i)
    ks = [k for k in (1, 3) if np.array_equal(out, np.rot90(image, k))]
    assert len(ks) == 1, f"seed {i}: not a 90 degree rotation"
    turns.update(ks)
  assert turns == {1, 3}


@pytest.mark.parametrize("axis", [0, 1])
def test_translate_shifts_exactly_with_grey_fill(axis):
  image, shifts = IMAGES["noise"], set()
  name = "TranslateY" if axis == 0 else "TranslateX"
  for i in range(8):
    out = _op(image, name, 0.5, i)  # 100 * 0.5 / 10 = 5 pixels.
    for shift in (5, -5):
      expected = np.full_like(image, 128)
      src = [slice(None)] * 2
      dst = [slice(None)] * 2
      src[axis] = slice(0, -5) if shift > 0 else slice(5, None)
      dst[axis] = slice(5, None) if shift > 0 else slice(0, -5)
      expected[tuple(dst)] = image[tuple(src)]
      if np.array_equal(out, expected):
        shifts.add(shift)
        break
    else:
      raise AssertionError(f"seed {i}: not a 5 pixel shift with grey fill")
  assert shifts == {5, -5}


def test_shear_x_keeps_top_row_and_shifts_bottom_row():
  image = IMAGES["noise"]
  shift = round(0.3 * (H - 1))  # Magnitude 10: 0.3; the last row moves 12.
  for i in range(4):
    out = _op(image, "ShearX", 10, i)
    np.testing.assert_array_equal(out[0], image[0])
    left = np.concatenate([image[-1, shift:], np.full((shift, 3), 128)])
    right = np.concatenate([np.full((shift, 3), 128), image[-1, :-shift]])
    assert np.array_equal(out[-1], left) or np.array_equal(out[-1], right)
    np.testing.assert_array_equal(
        _op(image, "ShearY", 10, i)[:, 0], image[:, 0])


def test_cutout_greys_one_square():
  image = _noise(4, 0, 100)  # No grey 128 before the cutout.
  half = int(40 * 1.5 / 10)  # Magnitude 1.5: a 12 x 12 square.
  sizes = []
  for i in range(16):
    out = _op(image, "Cutout", 1.5, i)
    grey = np.all(out == 128, -1)
    ys, xs = np.nonzero(grey)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    assert grey[box].all() and grey.sum() == grey[box].size
    np.testing.assert_array_equal(out[~grey], image[~grey])
    height, width = grey[box].shape
    inner_y = 0 < ys.min() and ys.max() < H - 1
    inner_x = 0 < xs.min() and xs.max() < W - 1
    assert height <= 2 * half and width <= 2 * half
    assert height == 2 * half or not inner_y
    assert width == 2 * half or not inner_x
    sizes.append((height, width))
  assert (2 * half, 2 * half) in sizes


@pytest.mark.parametrize("name", randaugment.OPS)
def test_every_op_keeps_shape_and_dtype(name):
  for magnitude in (0, 10, 15):
    out = randaugment.apply_op(IMAGES["gradient"], name, magnitude, _seed(0))
    assert out.dtype == tf.uint8 and out.shape == (H, W, 3)


def test_unknown_op_raises():
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    randaugment.apply_op(IMAGES["noise"], "Blur", 5, _seed(0))


def _augment_batch(seeds, image_name="gradient", **kwargs):
  return np.stack([randaugment.randaugment(IMAGES[image_name], _seed(i),
                                           **kwargs).numpy() for i in seeds])


def test_same_seed_same_output_and_seeds_differ():
  kwargs = dict(num_layers=2, magnitude=9)
  first = _augment_batch(range(12), **kwargs)
  np.testing.assert_array_equal(first, _augment_batch(range(12), **kwargs))
  distinct = {a.tobytes() for a in first}
  assert len(distinct) >= 8, "different seeds should mostly differ"


def test_num_layers_zero_is_identity():
  out = randaugment.randaugment(IMAGES["noise"], _seed(0), 0, 10)
  np.testing.assert_array_equal(out.numpy(), IMAGES["noise"])


def test_every_layer_applies_its_op():
  image = IMAGES["noise"]
  # Magnitude 7: every op changes this image (enhance factor 1.36 != 1; not
  # the gradient, which Sharpness leaves alone: smoothing keeps linear ramps).
  unchanged = [np.array_equal(a, image) for a in _augment_batch(
      range(48), "noise", num_layers=1, magnitude=7)]
  assert not any(unchanged)


def test_tf_data_map_matches_eager_with_unknown_shapes():
  images = [_noise(5), _gradient((33, 57, 3)), _noise(6, shape=(50, 31, 3))]
  images = [images[i % 3] for i in range(9)]
  spec = (tf.TensorSpec([None, None, 3], tf.uint8),
          tf.TensorSpec([2], tf.int64))
  ds = tf.data.Dataset.from_generator(
      lambda: ((im, [3, i]) for i, im in enumerate(images)),
      output_signature=spec)
  ds = ds.map(lambda im, s: randaugment.randaugment(im, s, 3, 15),
              num_parallel_calls=4, deterministic=True)
  assert ds.element_spec.shape.as_list() == [None, None, 3]
  graph = list(ds.as_numpy_iterator())
  for i, (image, out) in enumerate(zip(images, graph)):
    eager = randaugment.randaugment(image, tf.constant([3, i], tf.int64), 3, 15)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, eager.numpy())
