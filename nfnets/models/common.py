"""What the model files share: input checks, the block loop, the head.

Every network here is a stem, residual blocks that return their output and
their residual branch's variance, and a pooled classifier; `apply_blocks`
runs the blocks and collects the signal-propagation metrics of each.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers


def check_image(images: jax.Array, total_stride: int) -> None:
  """Raises a clear ValueError for images a network cannot take."""
  if images.ndim != 4:
    raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
  if min(images.shape[1:3]) < total_stride:
    raise ValueError(
        f"image {images.shape[1]}x{images.shape[2]} is smaller than the "
        f"network's total stride {total_stride}; use at least "
        f"{total_stride}x{total_stride}")


def residual_end(branch: jax.Array, shortcut: jax.Array, *, se, alpha: float,
                 drop_rate: float, scale_by_keep: bool,
                 is_training: bool) -> tuple[jax.Array, jax.Array]:
  """`shortcut + alpha * skip_gain * [2 * SE gate] * branch`, with stochastic
  depth: how the NF blocks end (ICML 2021, Sec. 5.1; ICLR 2021, Sec. 4).

  Call it inside the block's `__call__`: it creates the block's `skip_gain`
  (a scalar, zero at init). The factors fold into one multiply of the branch
  (`layers.stochastic_depth`).

  Args:
    branch: the residual branch's output [N, H, W, C].
    shortcut: what it is added to.
    se: the block's `layers.SqueezeExcite`, or None.
    alpha: the residual scale.
    drop_rate: the block's stochastic-depth rate.
    scale_by_keep: divide kept branches by the keep probability.
    is_training: drops branches only in training.

  Returns:
    (block output, the gated branch's average channel variance).
  """
  skip_gain = hk.get_parameter("skip_gain", (), init=jnp.zeros)
  scale = skip_gain.astype(jnp.float32) * alpha
  if se is not None:
    gate = 2.0 * se(branch).astype(jnp.float32)
    scale = scale * gate
    # The gated branch itself is only needed for the signal metrics.
    _, res_var = layers.signal_metrics(gate * branch)
  else:
    _, res_var = layers.signal_metrics(branch)
  out = layers.stochastic_depth(branch, drop_rate, is_training, scale,
                                scale_by_keep)
  return out + shortcut, res_var


def classifier(num_classes: int, init_std: float) -> hk.Linear:
  """The head `linear`: weights N(0, init_std^2), or zeros for 0; bias 0.

  The released NFNet and NF-ResNet code initialise it with N(0, 0.01^2);
  zeros (`init_std=0`) suit fine-tuning a new head.
  """
  if init_std < 0:
    raise ValueError(f"fc_init_std must be >= 0, got {init_std}")
  w_init = (hk.initializers.RandomNormal(init_std) if init_std > 0
            else jnp.zeros)
  return hk.Linear(num_classes, w_init=w_init, name="linear")


def classify(features: jax.Array, classifier: hk.Module, dropout_rate: float,
             is_training: bool) -> jax.Array:
  """Global average pool, dropout when training, then the classifier."""
  pooled = jnp.mean(features, axis=(1, 2))
  if is_training and dropout_rate > 0:
    pooled = hk.dropout(hk.next_rng_key(), dropout_rate, pooled)
  return classifier(pooled)


def apply_blocks(blocks, stages, x: jax.Array, is_training: bool,
                 remat: bool = False):
  """Runs residual blocks, collecting the per-block signal metrics.

  Args:
    blocks: modules returning (output, residual-branch average variance).
    stages: the stage index of each block.
    x: the input to the first block.
    is_training: passed to each block.
    remat: recompute each block's activations in the backward pass
      (`hk.remat`) instead of storing them: only block inputs stay in
      memory, for about one more forward pass of compute.

  Returns:
    The last block's output and a dict of per-block arrays: `avg_sq_mean` and
    `avg_var` of each block's output, `res_var` of its residual branch's end
    (before stochastic depth and skip_gain), and `stage`.
  """
  sq_means, variances, res_vars = [], [], []
  for block in blocks:
    call = functools.partial(block, is_training=is_training)
    x, res_var = (hk.remat(call) if remat else call)(x)
    sq_mean, var = layers.signal_metrics(x)
    sq_means.append(sq_mean)
    variances.append(var)
    res_vars.append(res_var)
  return x, {
      "avg_sq_mean": jnp.stack(sq_means),
      "avg_var": jnp.stack(variances),
      "res_var": jnp.stack(res_vars),
      "stage": jnp.asarray(stages, jnp.int32),
  }
