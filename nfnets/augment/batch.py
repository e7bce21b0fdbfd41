"""The training batch's augmentation on the accelerator, in the released order.

The host decodes, crops, resizes and flips (`nfnets.data.pipeline`) and sends
uint8 crops; `DeviceAugment` runs inside the jitted train step, per device,
on that device's slice: MixUp / CutMix first (two crops per example), then
RandAugment on each mixed image clipped and truncated to uint8 (the released
code's `augment_before_mix=False`), then the ImageNet normalisation.

Every random choice of example j comes from `fold_in(key, j)`, j the
example's index in the global batch, and the step's `key`: the augmented
batch is the same on any number of devices and hosts, and a resumed run sees
the same augmentations.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.augment import mixing
from nfnets.augment import randaugment
from nfnets.data import transforms


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
  """The on-device part of the training preprocessing.

  Attributes:
    randaugment_layers: RandAugment ops per example (0: off).
    randaugment_magnitude: their magnitude (0-10 scale, extrapolated above).
    mixup_alpha: MixUp's Beta(alpha, alpha) parameter (0: off).
    cutmix_alpha: CutMix's box-ratio Beta parameter (0: off; 1: uniform, the
      released code's).
    mixup_or_cutmix: with both on, one of the two for the whole batch (a
      fair coin per step) instead of half the examples each (the released
      code's `my_mixup_cutmix`: here even examples MixUp, odd CutMix).
    num_classes: the label count (soft labels when mixing).
  """
  randaugment_layers: int = 0
  randaugment_magnitude: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mixup_or_cutmix: bool = False
  num_classes: int = 0

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  @property
  def crops_per_example(self) -> int:
    """2 when mixing (the host sends both crops of each example), else 1."""
    return 2 if self.mixes else 1

  def __call__(self, images: jax.Array, labels: jax.Array, key: jax.Array,
               first_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Augments one device's slice of the batch.

    Args:
      images: uint8 [n * crops_per_example, H, W, 3]; when mixing, rows 2j
        and 2j + 1 are example j's two crops.
      labels: int32 [n * crops_per_example].
      key: the step's key (the same on every device).
      first_index: the global index of this slice's first example.

    Returns:
      (float32 [n, H, W, 3] normalised, labels: int32 [n], or float32 [n,
      num_classes] soft labels when mixing).
    """
    crops = self.crops_per_example
    n = images.shape[0] // crops
    index = first_index + jnp.arange(n)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    mix_keys, ra_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    if self.mixes:
      pairs = images.reshape(n, 2, *images.shape[1:])
      pair_labels = labels.reshape(n, 2)
      if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
        if self.mixup_or_cutmix:
          # One coin for the batch, from a stream no example index reaches.
          coin = jax.random.bernoulli(
              jax.random.fold_in(key, np.uint32(0xFFFFFFFF)))
          use_cutmix = jnp.full((n,), coin)
        else:
          use_cutmix = index % 2 == 1
      else:
        use_cutmix = jnp.full((n,), self.cutmix_alpha > 0)
      mix = lambda p, y, k, c: mixing.mix_pair(  # pylint: disable=g-long-lambda
          p, y, k, c, mixup_alpha=self.mixup_alpha,
          cutmix_alpha=self.cutmix_alpha, num_classes=self.num_classes)
      pixels, labels = jax.vmap(mix)(pairs, pair_labels, mix_keys,
                                     use_cutmix)
    else:
      pixels = images.astype(jnp.float32)
    if self.randaugment_layers > 0:
      # As the released `_augment_image`: clipped and truncated to uint8.
      quantised = jnp.clip(pixels, 0.0, 255.0).astype(jnp.uint8)
      augment = lambda x, k: randaugment.randaugment(  # pylint: disable=g-long-lambda
          x, k, self.randaugment_layers, self.randaugment_magnitude)
      pixels = jax.vmap(augment)(quantised, ra_keys).astype(jnp.float32)
    mean = np.asarray(transforms.MEAN_RGB, np.float32)
    std = np.asarray(transforms.STDDEV_RGB, np.float32)
    return (pixels - mean) / std, labels
