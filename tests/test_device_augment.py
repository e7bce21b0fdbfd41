"""MixUp / CutMix and the batch augmentation on the device (nfnets.augment).

The released code (`nfnets/dataset.py`, `my_mixup_cutmix`, `cutmix_padding`)
mixes 2B crops into B examples, half MixUp and half CutMix, then applies
RandAugment to each mixed image. RandAugment's ops: test_device_randaugment.py.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from nfnets.augment import batch as augment_batch
from nfnets.augment import mixing
from nfnets.data import transforms
from nfnets.training import parallel


def _constant_pairs(n, size=16):
  """Pairs whose first crop is all 200 and second all 40, labels (1, 2)."""
  first = np.full((n, 1, size, size, 3), 200, np.uint8)
  second = np.full((n, 1, size, size, 3), 40, np.uint8)
  images = np.concatenate([first, second], 1).reshape(2 * n, size, size, 3)
  labels = np.tile(np.asarray([1, 2], np.int32), n)
  return images, labels


def test_cutmix_box_is_the_released_construction():
  # cutmix_padding: centre uniform over the pixels, p uniform (alpha 1),
  # sides int(sqrt(1 - p) * H), corners r -+ side // 2, clipped.
  height, width = 24, 32
  for seed in range(20):
    key = jax.random.PRNGKey(seed)
    box = np.asarray(mixing.cutmix_box(key, height, width, 1.0))
    centre_key, ratio_key = jax.random.split(key)
    r_y, r_x = np.asarray(jax.random.randint(
        centre_key, (2,), 0, jnp.asarray([height, width])))
    p = float(jax.random.uniform(ratio_key, ()))
    r_h = int(np.float32(np.sqrt(np.float32(1 - p))) * height)
    r_w = int(np.float32(np.sqrt(np.float32(1 - p))) * width)
    expected = np.zeros((height, width), np.float32)
    y0, y1 = (int(np.clip(r_y + d, 0, height)) for d in (-(r_h // 2),
                                                        r_h // 2))
    x0, x1 = (int(np.clip(r_x + d, 0, width)) for d in (-(r_w // 2),
                                                       r_w // 2))
    expected[y0:y1, x0:x1] = 1.0
    np.testing.assert_array_equal(box, expected)


def test_two_crops_make_one_mixed_example_with_its_soft_label():
  # 8 examples from 16 crops; even examples MixUp, odd CutMix.
  images, labels = _constant_pairs(8)
  augment = augment_batch.DeviceAugment(mixup_alpha=0.2, cutmix_alpha=1.0,
                                        num_classes=4)
  out, soft = augment(jnp.asarray(images), jnp.asarray(labels),
                      jax.random.PRNGKey(0), 0)
  assert out.shape == (8, 16, 16, 3) and soft.shape == (8, 4)
  mean = np.asarray(transforms.MEAN_RGB, np.float32)
  std = np.asarray(transforms.STDDEV_RGB, np.float32)
  pixels = np.asarray(out) * std + mean
  soft = np.asarray(soft)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  assert np.all(soft[:, [0, 3]] == 0)
  for j in range(8):
    if j % 2 == 0:  # MixUp: r * 200 + (1 - r) * 40 everywhere.
      ratio = (pixels[j, 0, 0, 0] - 40) / 160
      np.testing.assert_allclose(pixels[j], 40 + 160 * ratio, atol=1e-3)
    else:  # CutMix: 200 in the box, 40 outside; the ratio is its area.
      inside = np.isclose(pixels[j, :, :, 0], 200, atol=1e-3)
      assert np.all(inside | np.isclose(pixels[j, :, :, 0], 40, atol=1e-3))
      rows, cols = np.nonzero(inside)
      if rows.size:
        box = np.zeros_like(inside)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        np.testing.assert_array_equal(inside, box)
      ratio = inside.mean()
    np.testing.assert_allclose(soft[j, 1], ratio, atol=1e-5)
    np.testing.assert_allclose(soft[j, 2], 1 - ratio, atol=1e-5)


def test_mixup_ratio_follows_beta():
  n = 4000
  images, labels = _constant_pairs(n, size=2)
  augment = augment_batch.DeviceAugment(mixup_alpha=0.2, num_classes=3)
  _, soft = augment(jnp.asarray(images), jnp.asarray(labels),
                    jax.random.PRNGKey(1), 0)
  ratio = np.asarray(soft)[:, 1]
  # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 * (2 * 0.2 + 1)) = 0.1786.
  assert abs(ratio.mean() - 0.5) < 0.03
  assert abs(ratio.var() - 0.1786) < 0.015


def test_mixup_or_cutmix_picks_one_for_the_whole_batch():
  images, labels = _constant_pairs(8)
  augment = augment_batch.DeviceAugment(mixup_alpha=0.2, cutmix_alpha=1.0,
                                        mixup_or_cutmix=True, num_classes=4)
  kinds = set()
  for seed in range(8):
    out, _ = augment(jnp.asarray(images), jnp.asarray(labels),
                     jax.random.PRNGKey(seed), 0)
    first = np.asarray(out)[..., 0]
    # CutMix images take only the two crops' values; MixUp ones blend.
    cut = [np.unique(np.round(x, 3)).size <= 2 and
           not np.allclose(x, x.flat[0]) for x in first]
    blended = [np.allclose(x, x.flat[0]) for x in first]
    assert all(c or b for c, b in zip(cut, blended))
    kinds.add("cutmix" if any(cut) else "mixup")
    assert not (any(cut) and all(blended))
  assert kinds == {"cutmix", "mixup"}


def test_the_augmented_batch_is_the_same_on_one_and_eight_devices():
  # Example j's randomness comes from fold_in(key, j), j its global index.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 16, 16, 3), np.uint8)
  labels = rng.integers(0, 10, 32).astype(np.int32)
  augment = augment_batch.DeviceAugment(
      randaugment_layers=2, randaugment_magnitude=10.0, mixup_alpha=0.2,
      cutmix_alpha=1.0, num_classes=10)
  key = jax.random.PRNGKey(3)
  results = []
  for count in (1, 8):
    mesh = Mesh(np.asarray(jax.devices()[:count]), (parallel.AXIS,))

    def per_device(x, y):  # as in the train step (steps.py)
      n = x.shape[0] // 2
      return augment(x, y, key, jax.lax.axis_index(parallel.AXIS) * n)

    mapped = jax.jit(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(parallel.AXIS), P(parallel.AXIS)),
        out_specs=(P(parallel.AXIS), P(parallel.AXIS)), check_vma=False))
    results.append(jax.device_get(mapped(images, labels)))
  (one_x, one_y), (eight_x, eight_y) = results
  np.testing.assert_array_equal(one_x, eight_x)
  np.testing.assert_array_equal(one_y, eight_y)
  assert one_x.shape == (16, 16, 16, 3)


def test_without_mixing_crops_are_normalised_one_per_example():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (4, 8, 8, 3), np.uint8)
  labels = np.arange(4, dtype=np.int32)
  augment = augment_batch.DeviceAugment(num_classes=10)
  assert augment.crops_per_example == 1
  out, out_labels = augment(jnp.asarray(images), jnp.asarray(labels),
                            jax.random.PRNGKey(0), 0)
  np.testing.assert_allclose(out, transforms.normalize(images), rtol=1e-6)
  np.testing.assert_array_equal(out_labels, labels)


@pytest.mark.parametrize("alphas", [(0.2, 0.0), (0.0, 1.0)])
def test_one_kind_of_mixing_alone(alphas):
  images, labels = _constant_pairs(6)
  augment = augment_batch.DeviceAugment(mixup_alpha=alphas[0],
                                        cutmix_alpha=alphas[1], num_classes=3)
  out, soft = augment(jnp.asarray(images), jnp.asarray(labels),
                      jax.random.PRNGKey(2), 0)
  first = np.asarray(out)[..., 0]
  flat = [np.allclose(x, x.flat[0]) for x in first]
  assert all(flat) if alphas[0] else not all(flat)
  np.testing.assert_allclose(np.asarray(soft).sum(-1), 1.0, rtol=1e-6)
