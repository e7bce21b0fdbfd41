"""Tests of the on-device RandAugment against numpy versions of the reference.

The reference is `distort_image_with_randaugment` in DeepMind's released NFNet
code (deepmind-research `nfnets/autoaugment.py`); randaugment_reference.py
restates each of its ops in numpy, independently of `nfnets.augment`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from nfnets.augment import geometric
from nfnets.augment import randaugment as ra
import randaugment_reference as reference  # pylint: disable=g-bad-import-order

SEED = 0
H, W = 20, 28  # Non-square, so that height and width mix-ups show.
MAGNITUDES = (5, 10, 15)
# The reference's level_to_arg written out (translate_const 100, cutout 40).
PIXELS = {5: 50, 10: 100, 15: 150}
BITS = {5: 2, 10: 4, 15: 6}
SOLARIZE = {5: 128, 10: 0, 15: 128}  # int(25.6 M) mod 256, TF's uint8.
ADDITION = {5: 55, 10: 110, 15: 165}
PAD = {5: 20, 10: 40, 15: 60}
OP = {name: i for i, name in enumerate(ra.OPS)}


def _factor(m):  # Color, Contrast, Brightness, Sharpness.
  return m / 10 * 1.8 + 0.1


def _image(h=H, w=W, seed=SEED):
  """Channel 0 in [37, 140] (a fractional AutoContrast scale), channel 1
  over 0..255, channel 2 in [100, 110] (few values for Equalize)."""
  rng = np.random.default_rng(seed)
  image = np.stack([rng.integers(37, 141, (h, w)), rng.integers(0, 256, (h, w)),
                    rng.integers(100, 111, (h, w))], -1).astype(np.uint8)
  image[0, 0] = (37, 0, 100)
  image[-1, -1] = (140, 255, 110)
  return image


@functools.partial(jax.jit, static_argnames=("magnitude", "names"))
def _ops(image, keys, magnitude, names=ra.OPS):
  """uint8 [K, len(names), H, W, 3]: each op at `magnitude`, for each key."""
  return jax.vmap(lambda key: jnp.stack([
      ra.apply_op(image, name, magnitude, key) for name in names]))(keys)


def _keys(n, seed=SEED):
  return jax.random.split(jax.random.key(seed), n)


def _signs_matched(outputs, plus, minus):
  """The signs whose reference the outputs equal; each must equal one."""
  assert not np.array_equal(plus, minus)
  signs = set()
  for out in outputs:
    matches = [s for s, ref in ((1, plus), (-1, minus))
               if np.array_equal(out, ref)]
    assert matches, "output is neither sign's reference"
    signs.add(matches[0])
  return signs


@pytest.mark.parametrize("m", MAGNITUDES)
def test_each_op_matches_the_reference(m):
  image = _image()
  out = np.asarray(_ops(image, _keys(16), float(m)))
  assert out.dtype == np.uint8 and out.shape == (16, len(ra.OPS), H, W, 3)
  f = _factor(m)
  expected = {
      "AutoContrast": reference.np_autocontrast(image),
      "Equalize": reference.np_equalize(image),
      "Invert": 255 - image,
      "Posterize": image >> (8 - BITS[m]) << (8 - BITS[m]),
      "Solarize": np.where(image < SOLARIZE[m], image, 255 - image),
      "Color": reference.np_color(image, f),
      "Contrast": reference.np_contrast(image, f),
      "Brightness": reference.np_blend(np.zeros_like(image), image, f),
      "Sharpness": reference.np_sharpness(image, f),
      "SolarizeAdd": np.where(image < 128, np.minimum(
          image.astype(int) + ADDITION[m], 255), image),
      # Shifts of 50 px and more leave nothing of a 28 px wide image.
      "TranslateX": np.full_like(image, 128),
      "TranslateY": np.full_like(image, 128),
  }
  for name, want in expected.items():
    for k in range(out.shape[0]):
      np.testing.assert_array_equal(out[k, OP[name]], want, err_msg=name)
  level = m / 10
  for name, transform in (
      ("Rotate", lambda s: reference.np_rotation(s * level * 30, H, W)),
      ("ShearX", lambda s: [1, s * level * 0.3, 0, 0, 1, 0]),
      ("ShearY", lambda s: [1, 0, 0, s * level * 0.3, 1, 0])):
    signs = _signs_matched(out[:, OP[name]], reference.np_warp(image, transform(1)),
                           reference.np_warp(image, transform(-1)))
    assert signs == {1, -1}, name
  # Cutout: some uniform centre's clipped square of side 2 * pad, grey.
  centres = set()
  for k in range(out.shape[0]):
    found = [(cy, cx) for cy in range(H) for cx in range(W)
             if np.array_equal(out[k, OP["Cutout"]],
                               reference.np_cutout(image, PAD[m], cy, cx))]
    assert found, "Cutout is no clipped square at any centre"
    centres.add(found[0])
  assert m > 5 or len(centres) > 1


def test_magnitude_quirks():
  out = {m: np.asarray(_ops(_image(), _keys(16), float(m)))[0]
         for m in MAGNITUDES}
  assert _factor(5) == 1.0  # So the four enhancers are the identity at M=5.
  for name in ("Color", "Contrast", "Brightness", "Sharpness"):
    np.testing.assert_array_equal(out[5][OP[name]], _image())
    assert not np.array_equal(out[10][OP[name]], _image())
  # Solarize: 256 wraps to 0, nothing is below it: every pixel inverted.
  np.testing.assert_array_equal(out[10][OP["Solarize"]], 255 - _image())
  np.testing.assert_array_equal(out[15][OP["Solarize"]], out[5][OP["Solarize"]])
  for m, bits in BITS.items():  # Higher M keeps more bits.
    posterized = out[m][OP["Posterize"]]
    assert not np.any(posterized & ((1 << (8 - bits)) - 1))
    assert np.any(posterized & (1 << (8 - bits)))


def test_contrast_blends_towards_pixel_count_over_256():
  for (h, w), grey in (((24, 24), 2), ((160, 160), 100), ((256, 256), 255)):
    image = np.random.default_rng(SEED).integers(0, 256, (h, w, 3))
    image = image.astype(np.uint8)
    out = np.asarray(ra.contrast(image, _factor(10)))
    want = reference.np_blend(np.full_like(image, grey), image, _factor(10))
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("m", MAGNITUDES)
def test_translate_and_cutout_sizes_on_a_large_image(m):
  size = 160  # More than the 150 px shift at M=15.
  rng = np.random.default_rng(SEED)
  image = rng.choice(np.r_[0:128, 129:256], (size, size, 3)).astype(np.uint8)
  names = ("TranslateX", "TranslateY", "Cutout")
  out = np.asarray(_ops(image, _keys(8, seed=1), float(m), names))
  p = PIXELS[m]
  for i, axis in ((0, 1), (1, 0)):
    signs = _signs_matched(out[:, i], reference.np_shift(image, p, axis),
                           reference.np_shift(image, -p, axis))
    assert signs == {1, -1}
  for cut in out[:, 2]:
    grey = np.all(cut == 128, axis=-1)
    assert np.array_equal(cut[~grey], image[~grey])
    rows, cols = np.nonzero(grey.any(1))[0], np.nonzero(grey.any(0))[0]
    # The square's clipped sides pin its centre down (a side that is not
    # clipped at the near edge starts at c - pad, else ends at c + pad).
    cy = rows[0] + PAD[m] if rows[0] > 0 else rows[-1] + 1 - PAD[m]
    cx = cols[0] + PAD[m] if cols[0] > 0 else cols[-1] + 1 - PAD[m]
    assert 0 <= cy < size and 0 <= cx < size
    np.testing.assert_array_equal(cut, reference.np_cutout(image, PAD[m], cy, cx))


def test_blend_on_every_pair_of_values():
  # At M = 7, 9 and 20, for example, a fused multiply-add (one rounding
  # where TF rounded twice) would change some pairs; at 5, 10, 15 none.
  first, second = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
  image1 = np.repeat(first[..., None], 3, -1).astype(np.uint8)
  image2 = np.repeat(second[..., None], 3, -1).astype(np.uint8)
  blend = jax.jit(ra.blend, static_argnums=2)  # Jitted: XLA fuses there.
  for m in range(21):
    np.testing.assert_array_equal(blend(image1, image2, _factor(m)),
                                  reference.np_blend(image1, image2, _factor(m)))


def test_color_grey_level_where_rounding_matters():
  # The (r, g, b) whose grey level * 255.5 lands within a few float32 ulps
  # above an integer: any other rounding of the dot product (a fused
  # multiply-add, another order) truncates some of them differently.
  rgb = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255)
  w = np.array([0.2989, 0.5870, 0.1140], np.float32)
  triples = []
  for r in range(256):
    grey = ((rgb[r] * w[0] + rgb[:, None] * w[1]) + rgb[None, :] * w[2])
    scaled = grey * np.float32(255.5)
    g, b = np.nonzero(scaled - np.floor(scaled) < 4e-6 * scaled)
    triples.append(np.stack([np.full_like(g, r), g, b], -1))
  image = np.concatenate(triples)[None].astype(np.uint8)
  assert image.shape[1] > 1000
  color = jax.jit(ra.color, static_argnums=1)
  # Factor 0 returns the degenerate image: the grey level itself.
  np.testing.assert_array_equal(color(image, 0.0), reference.np_color(image, 0.0))


def test_autocontrast_on_many_ranges():
  rng = np.random.default_rng(SEED)
  lo = rng.integers(0, 255, (64, 3))
  hi = lo + 1 + (rng.random((64, 3)) * (255 - lo)).astype(int)
  ramp = np.arange(256).reshape(16, 16, 1)
  images = np.minimum(lo[:, None, None] + ramp, hi[:, None, None])
  images = images.astype(np.uint8)  # Each channel holds every value lo..hi.
  out = np.asarray(jax.jit(jax.vmap(ra.autocontrast))(images))
  for image, got in zip(images, out):
    np.testing.assert_array_equal(got, reference.np_autocontrast(image))


def test_geometric_ops_with_a_given_sign():
  image = _image(16, 16)
  np.testing.assert_array_equal(geometric.rotate(image, 90.0), np.rot90(image))
  np.testing.assert_array_equal(geometric.rotate(image, -90.0), np.rot90(image, -1))
  np.testing.assert_array_equal(geometric.translate_x(image, 5.0),
                                reference.np_shift(image, 5, axis=1))
  np.testing.assert_array_equal(geometric.translate_y(image, -3.0),
                                reference.np_shift(image, -3, axis=0))
  np.testing.assert_array_equal(geometric.shear_x(image, 0.3),
                                reference.np_warp(image, [1, 0.3, 0, 0, 1, 0]))
  np.testing.assert_array_equal(geometric.shear_y(image, -0.3),
                                reference.np_warp(image, [1, 0, 0, -0.3, 1, 0]))


def test_ops_that_equal_pil():
  rng = np.random.default_rng(SEED)
  # Ranges 51, 255 and 17: whole-number scales, where PIL's float64 LUT and
  # the reference's float32 arithmetic agree exactly.
  image = np.stack([rng.integers(10, 62, (H, W)), rng.integers(0, 256, (H, W)),
                    rng.integers(100, 118, (H, W))], -1).astype(np.uint8)
  image[0, 0], image[-1, -1] = (10, 0, 100), (61, 255, 117)
  pil = Image.fromarray(image)
  np.testing.assert_array_equal(ra.autocontrast(image),
                                np.asarray(ImageOps.autocontrast(pil)))
  out = {m: np.asarray(_ops(_image(), _keys(16), float(m)))[0]
         for m in MAGNITUDES}
  pil = Image.fromarray(_image())
  for m in MAGNITUDES:
    np.testing.assert_array_equal(out[m][OP["Equalize"]],
                                  np.asarray(ImageOps.equalize(pil)))
    np.testing.assert_array_equal(out[m][OP["Invert"]],
                                  np.asarray(ImageOps.invert(pil)))
    np.testing.assert_array_equal(out[m][OP["Posterize"]],
                                  np.asarray(ImageOps.posterize(pil, BITS[m])))
  for m in (5, 15):
    np.testing.assert_array_equal(out[m][OP["Solarize"]],
                                  np.asarray(ImageOps.solarize(pil, 128)))


def test_flat_channel_and_posterize_extrapolation():
  image = _image()
  image[..., 2] = 77  # AutoContrast and Equalize leave a flat channel.
  assert np.all(np.asarray(ra.autocontrast(image))[..., 2] == 77)
  assert np.all(np.asarray(ra.equalize(image))[..., 2] == 77)
  # TF clamped the uint8 shift to 7: bits 0 (shift 8) keeps the top bit.
  np.testing.assert_array_equal(ra.posterize(image, 0), image & 0x80)


def test_vmap_equals_per_example_calls():
  images = np.stack([_image(seed=s) for s in range(4)])
  keys = _keys(4)
  augment = lambda x, k: ra.randaugment(x, k, 2, 10.0)
  batched = np.asarray(jax.jit(jax.vmap(augment))(images, keys))
  single = jax.jit(augment)
  assert batched.dtype == np.uint8 and batched.shape == images.shape
  for i in range(4):
    np.testing.assert_array_equal(batched[i], single(images[i], keys[i]))
  assert not np.array_equal(batched, images)


def test_each_layer_is_one_uniformly_drawn_op():
  image = _image()
  keys = _keys(48, seed=2)
  out = np.asarray(jax.jit(jax.vmap(
      lambda k: ra.randaugment(image, k, 1, 10.0)))(keys))
  # The documented key use: layer 0 of key k is split(k, 1)[0], split into
  # the op choice and the key of apply_op.
  layer = jax.vmap(lambda k: jax.random.split(jax.random.split(k, 1)[0]))(keys)
  index = np.asarray(jax.vmap(
      lambda k: jax.random.randint(k, (), 0, len(ra.OPS)))(layer[:, 0]))
  every = np.concatenate([np.asarray(_ops(image, layer[i:i + 16, 1], 10.0))
                          for i in range(0, len(keys), 16)])
  for k in range(len(keys)):
    np.testing.assert_array_equal(out[k], every[k, index[k]])
  assert len(set(index.tolist())) >= 12  # 48 uniform draws from 16.


def test_keys_zero_layers_and_raw_keys():
  image = _image(64, 64)  # At M=5 some of 50 px shifts and Cutout survive.
  augment = jax.jit(lambda k: ra.randaugment(image, k, 2, 5.0))
  raw = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(augment(raw), augment(raw))
  outs = {np.asarray(augment(jax.random.PRNGKey(s))).tobytes()
          for s in range(8)}
  assert len(outs) >= 6
  assert ra.randaugment(image, raw, 0, 10.0) is image


def test_bad_arguments():
  image = _image()
  key = jax.random.key(0)
  for bad in (image.astype(np.float32), image[..., :2], image[0]):
    with pytest.raises(ValueError, match="uint8"):
      ra.randaugment(bad, key, 2, 10.0)
  with pytest.raises(ValueError, match="unknown"):
    ra.apply_op(image, "Shear", 10.0, key)
  with pytest.raises(ValueError, match=">= 0"):
    ra.randaugment(image, key, 2, -1.0)
