"""MixUp and CutMix of neighbouring examples, with soft labels (TensorFlow).

`mix_pairs` runs on a batch inside the tf.data pipeline (`pipeline`): pairs
are the examples at positions (2i, 2i + 1) of the epoch's order, seeded per
pair, so the mixing does not depend on how processes split the batch.
TensorFlow is imported inside functions only.
"""


def _beta(seed, alpha: float, shape):
  """Beta(alpha, alpha) samples as a ratio of two stateless Gamma draws."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  g = tf.random.stateless_gamma([2] + list(shape), seed, alpha=alpha)
  return g[0] / (g[0] + g[1])


def _pair_draws(seed, mixup_alpha: float, cutmix_alpha: float):
  """One pair's random numbers: [mixup lambda, cutmix lambda, cy, cx]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  seeds = tf.random.experimental.stateless_split(seed, 3)
  mix = cut = 1.0
  if mixup_alpha:
    mix = _beta(seeds[0], mixup_alpha, [])
  if cutmix_alpha:
    cut = _beta(seeds[1], cutmix_alpha, [])
  centre = tf.random.stateless_uniform([2], seeds[2])
  return tf.stack([tf.cast(mix, tf.float32), tf.cast(cut, tf.float32),
                   centre[0], centre[1]])


def mix_pairs(images, labels, pair_seeds, positions, *, mixup_alpha: float,
              cutmix_alpha: float, num_classes: int):
  """MixUp or CutMix of the examples at positions (2i, 2i + 1), both ways.

  Pair `i` of the epoch gets MixUp if only MixUp is on or `i` is even, else
  CutMix. MixUp blends whole images with lambda ~ Beta(alpha, alpha); CutMix
  pastes a box of area ~(1 - lambda) of the other image at a uniform centre
  (clipped to the image) and uses the pasted area for the label weights.

  Args:
    images: float32 [B, H, W, 3], B even, pairs adjacent.
    labels: int32 [B].
    pair_seeds: int64 [B, 2], equal within a pair.
    positions: int64 [B], the examples' positions in the epoch's order.
    mixup_alpha: MixUp's Beta(alpha, alpha) parameter (0: off).
    cutmix_alpha: CutMix's Beta(alpha, alpha) parameter (0: off).
    num_classes: the length of the soft labels.

  Returns:
    (images float32 [B, H, W, 3], soft labels float32 [B, num_classes]),
    each soft label summing to 1.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.shape(images)
  h, w = shape[1], shape[2]
  # [P, 2, ...] views: no strided copies (slow in TF), and both members of a
  # pair share the weight map `keep` of their own image.
  pairs = tf.reshape(images, tf.concat([[-1, 2], shape[1:]], 0))
  onehot = tf.reshape(tf.one_hot(labels, num_classes,
                                 dtype=tf.float32),
                      [-1, 2, num_classes])
  first_positions = tf.reshape(positions, [-1, 2])[:, 0]
  draws = tf.map_fn(lambda s: _pair_draws(s, mixup_alpha, cutmix_alpha),
                    tf.reshape(pair_seeds, [-1, 2, 2])[:, 0],
                    fn_output_signature=tf.float32)
  use_cutmix = tf.zeros_like(first_positions, tf.bool)
  if cutmix_alpha:
    use_cutmix = tf.logical_or(mixup_alpha == 0,
                               (first_positions // 2) % 2 == 1)
  # CutMix box: side ratio sqrt(1 - lambda), centred at a uniform point.
  ratio = tf.sqrt(1.0 - draws[:, 1])
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  half_h, half_w = ratio * hf / 2, ratio * wf / 2
  cy, cx = draws[:, 2] * hf, draws[:, 3] * wf
  y0 = tf.clip_by_value(tf.round(cy - half_h), 0, hf)
  y1 = tf.clip_by_value(tf.round(cy + half_h), 0, hf)
  x0 = tf.clip_by_value(tf.round(cx - half_w), 0, wf)
  x1 = tf.clip_by_value(tf.round(cx + half_w), 0, wf)
  rows = tf.range(hf)[None, :, None]
  cols = tf.range(wf)[None, None, :]
  inside = ((rows >= y0[:, None, None]) & (rows < y1[:, None, None]) &
            (cols >= x0[:, None, None]) & (cols < x1[:, None, None]))
  box = tf.cast(inside, tf.float32)
  cut_lam = 1.0 - (y1 - y0) * (x1 - x0) / (hf * wf)
  # Per pair: the weight of each member's own image, as a map and a scalar.
  cut = tf.cast(use_cutmix, tf.float32)
  keep = (cut[:, None, None] * (1.0 - box) +
          (1.0 - cut[:, None, None]) * draws[:, 0][:, None, None])
  keep = keep[:, None, :, :, None]
  lam = (cut * cut_lam + (1.0 - cut) * draws[:, 0])[:, None, None]
  # own * keep + other * (1 - keep), with other = pair sum - own.
  total = tf.reduce_sum(pairs, 1, keepdims=True)
  mixed = (2.0 * keep - 1.0) * pairs + (1.0 - keep) * total
  soft = ((2.0 * lam - 1.0) * onehot +
          (1.0 - lam) * tf.reduce_sum(onehot, 1, keepdims=True))
  return (tf.reshape(mixed, shape),
          tf.reshape(soft, [-1, num_classes]))
