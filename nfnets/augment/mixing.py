"""MixUp and CutMix of crop pairs, as the released NFNet input (JAX).

DeepMind's released code (google-deepmind/deepmind-research
`nfnets/dataset.py`, `my_mixup_cutmix`, `cutmix_padding`) batches 2B crops
and returns B examples, every one a mix of two crops: half by MixUp (ratio
~ Beta(alpha, alpha), alpha 0.2), half by CutMix (a box of the first crop
pasted over the second, its side `sqrt(1 - p)` of the image's, p uniform, at
a uniform centre, clipped to the image; the label weight is the clipped box's
area). Here the two crops of example j are rows 2j and 2j + 1 of the batch,
so that a device's slice of the batch holds whole pairs, and example j's
randomness comes from its own key.
"""

import jax
import jax.numpy as jnp


def cutmix_box(key: jax.Array, height: int, width: int,
               alpha: float) -> jax.Array:
  """The released `cutmix_padding` mask: float32 [H, W], 1 inside the box.

  Centre `(r_y, r_x)` uniform over the pixels; `p ~ Beta(alpha, alpha)`
  (uniform for alpha 1, the released code's); sides `int(sqrt(1 - p) * H)`
  and `int(sqrt(1 - p) * W)`; corners `r - side // 2` and `r + side // 2`,
  clipped to the image.
  """
  centre_key, ratio_key = jax.random.split(key)
  r_y, r_x = jax.random.randint(centre_key, (2,), 0,
                                jnp.asarray([height, width]))
  if alpha == 1.0:
    p = jax.random.uniform(ratio_key, ())
  else:
    p = jax.random.beta(ratio_key, alpha, alpha)
  side = jnp.sqrt(1.0 - p)
  r_h = (side * height).astype(jnp.int32)
  r_w = (side * width).astype(jnp.int32)
  y0, y1 = (jnp.clip(r_y + d, 0, height) for d in (-(r_h // 2), r_h // 2))
  x0, x1 = (jnp.clip(r_x + d, 0, width) for d in (-(r_w // 2), r_w // 2))
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return inside.astype(jnp.float32)


def mix_pair(pair: jax.Array, labels: jax.Array, key: jax.Array,
             use_cutmix: jax.Array, *, mixup_alpha: float,
             cutmix_alpha: float, num_classes: int):
  """One example from two crops: MixUp or CutMix, with its soft label.

  Args:
    pair: [2, H, W, 3] crops (any real or integer dtype, 0-255 scale).
    labels: int [2], the crops' labels.
    key: this example's key.
    use_cutmix: bool scalar: CutMix (True) or MixUp (False).
    mixup_alpha: MixUp's Beta(alpha, alpha) parameter (> 0 if used).
    cutmix_alpha: the box ratio's Beta(alpha, alpha) parameter (> 0 if
      used; 1 is the released code's uniform).
    num_classes: the soft label's length.

  Returns:
    (float32 [H, W, 3] `w * first + (1 - w) * second`, float32
    [num_classes] `ratio * onehot(first) + (1 - ratio) * onehot(second)`),
    with `w` the MixUp ratio or the CutMix box and `ratio` its mean.
  """
  mix_key, cut_key = jax.random.split(key)
  height, width = pair.shape[1:3]
  first, second = pair.astype(jnp.float32)
  if mixup_alpha > 0:
    mix_ratio = jax.random.beta(mix_key, mixup_alpha, mixup_alpha)
  else:
    mix_ratio = jnp.ones((), jnp.float32)
  if cutmix_alpha > 0:
    box = cutmix_box(cut_key, height, width, cutmix_alpha)
  else:
    box = jnp.ones((height, width), jnp.float32)
  weight = jnp.where(use_cutmix, box, mix_ratio)[:, :, None]
  ratio = jnp.where(use_cutmix, jnp.mean(box), mix_ratio)
  image = weight * first + (1.0 - weight) * second
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return image, ratio * onehot[0] + (1.0 - ratio) * onehot[1]
