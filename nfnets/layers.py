"""Normalizer-free building blocks: WS convs, scaled activations, SE, stoch. depth.

References:
  Brock, De, Smith. "Characterizing signal propagation to close the performance
  gap in unnormalized ResNets." ICLR 2021 (NF-ResNets, Scaled WS, gamma).
  Brock, De, Smith, Simonyan. "High-Performance Large-Scale Image Recognition
  Without Normalization." ICML 2021 (NFNets).
"""

import math
from typing import Callable, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.ops import conv
from nfnets.ops import recompute
from nfnets.ops import standardize

Activation = Callable[[jax.Array], jax.Array]

# The activations the models can use, by name. GELU is the tanh approximation,
# as in the released NFNet code (its gamma differs from the exact GELU's).
ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "elu": jax.nn.elu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "leaky_relu": jax.nn.leaky_relu,  # negative slope 0.01
    "identity": lambda x: x,
}

# gamma = 1 / sqrt(Var[f(z)]), z ~ N(0, 1) (ICLR 2021, Sec. 4 and App. D).
# These are the released code's constants, kept so released weights evaluate
# as published. They are Monte-Carlo estimates, within 0.1% of the exact values
# that `activation_gamma` computes (ReLU: 1.71396 here, 1.71286 exact).
GAMMAS: dict[str, float] = {
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "swish": 1.7881293296813965,
    "elu": 1.2716004848480225,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
    "softplus": 1.9203323125839233,
    "leaky_relu": 1.70590341091156,
    "identity": 1.0,
}


def activation_gamma(fn: Activation, num_points: int = 400_001,
                     limit: float = 12.0) -> float:
  """Returns gamma = 1 / sqrt(Var[fn(z)]) for z ~ N(0, 1), by quadrature.

  The trapezoidal rule on a fine grid over [-limit, limit] is accurate to far
  better than 1e-6 here, including for kinked functions such as ReLU, where
  Gauss-Hermite quadrature converges slowly.

  Args:
    fn: an elementwise activation taking and returning arrays.
    num_points: grid points.
    limit: half-width of the grid in standard deviations.

  Returns:
    gamma as a Python float.
  """
  z = np.linspace(-limit, limit, num_points)
  # Evaluated now even while a model is traced (built inside jax.jit).
  with jax.ensure_compile_time_eval():
    f = np.asarray(fn(jnp.asarray(z, jnp.float32)), np.float64)
  pdf = np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
  mean = np.trapezoid(f * pdf, z)
  second = np.trapezoid(f * f * pdf, z)
  var = second - mean * mean
  if not var > 0:
    raise ValueError("activation has zero variance under N(0, 1); "
                     "it cannot be variance-scaled")
  return float(1.0 / np.sqrt(var))


def scaled_activation(name: Union[str, Activation]) -> Activation:
  """Returns `gamma * f(x)`: unit variance out for a unit Gaussian in.

  With the fast paths on, the backward pass keeps only the input and
  recomputes f from it (`nfnets.ops.recompute`; reverse mode only).

  Args:
    name: a key of `ACTIVATIONS`, or any elementwise callable (its gamma is
      then computed by `activation_gamma`).

  Returns:
    The scaled activation function.
  """
  if callable(name):
    fn, gamma = name, activation_gamma(name)
  elif name in ACTIVATIONS:
    fn, gamma = ACTIVATIONS[name], GAMMAS[name]
  else:
    raise ValueError(f"unknown activation {name!r}; valid: "
                     f"{', '.join(sorted(ACTIVATIONS))}")
  return recompute.recomputed(lambda x: fn(x) * jnp.asarray(gamma, x.dtype))


def fan_in_normal(shape: Sequence[int], dtype) -> jax.Array:
  """N(0, 1 / fan_in) for an [..., in, out] kernel (plain, not truncated).

  Plain normals also compile much faster on CPU than Haiku's truncated ones.
  """
  fan_in = int(np.prod(shape[:-1]))
  return jax.random.normal(hk.next_rng_key(), shape, dtype) / np.sqrt(fan_in)


class WSConv2D(hk.Module):
  """2D convolution with Scaled Weight Standardization, NHWC, HWIO kernels.

  Parameters `w` [kh, kw, in/groups, out] (fan-in normal init), `gain` [out]
  (init 1) and `bias` [out] (init 0), named as in the released NFNet
  checkpoints. The kernel is standardized in float32 and then cast to the
  input's dtype, so bfloat16 compute keeps an exact standardization.
  With `standardize=False` it is a plain conv (kernel times gain), the
  no-WS control of the signal-propagation study.
  """

  def __init__(self, output_channels: int,
               kernel_shape: Union[int, Sequence[int]] = 1,
               stride: Union[int, Sequence[int]] = 1,
               feature_group_count: int = 1,
               standardize: bool = True,
               eps: float = 1e-4,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = ((kernel_shape, kernel_shape)
                         if isinstance(kernel_shape, int) else
                         tuple(kernel_shape))
    self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    self.feature_group_count = feature_group_count
    self.standardize = standardize
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    in_ch = x.shape[-1]
    groups = self.feature_group_count
    if in_ch % groups or self.output_channels % groups:
      raise ValueError(
          f"{self.module_name}: {in_ch} input and {self.output_channels} "
          f"output channels must both divide into {groups} groups")
    shape = (*self.kernel_shape, in_ch // groups, self.output_channels)
    w = hk.get_parameter("w", shape, init=fan_in_normal)
    gain = hk.get_parameter("gain", (self.output_channels,), init=jnp.ones)
    bias = hk.get_parameter("bias", (self.output_channels,), init=jnp.zeros)
    if self.standardize:
      kernel = standardize.standardize_weight(w, gain, self.eps)
    else:
      kernel = w.astype(jnp.float32) * gain.astype(jnp.float32)
    out = conv.conv2d(x, kernel.astype(x.dtype), self.stride, groups)
    return out + bias.astype(out.dtype)


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite: global mean, dense, ReLU, dense, sigmoid.

  Returns the per-channel gate [N, 1, 1, C] (not the gated input), so the
  NFNet block can apply it as `2 * gate * x` (ICML 2021, Sec. 5.1).
  """

  def __init__(self, output_channels: int, hidden_channels: int,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.fc0 = hk.Linear(hidden_channels, name="linear")
    self.fc1 = hk.Linear(output_channels, name="linear_1")

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc1(jax.nn.relu(self.fc0(h)))
    return jax.nn.sigmoid(h)[:, None, None, :]


def stochastic_depth(x: jax.Array, drop_rate: float, is_training: bool,
                     scale: Union[float, jax.Array] = 1.0,
                     scale_by_keep: bool = False) -> jax.Array:
  """Drops whole residual branches per example (stochastic depth).

  As in the released NFNet code (`base.StochDepth`, `scale_by_keep=False`),
  a kept branch is not rescaled by default, so the expected branch shrinks
  by the keep probability at training time and is whole at evaluation time.
  `scale_by_keep=True` divides kept branches by the keep probability instead
  (the EfficientNet / timm convention), which keeps the expectation equal.

  Any other per-example or per-channel factor of the branch (skip gain, SE
  gate) comes in as `scale` and is folded into the same multiply: the branch
  output is read once, and in the backward pass one reduction over space
  gives the gradient of every factor (multiplying by each in turn costs a
  full pass over the activations per factor, forward and backward).

  Args:
    x: a batch [N, ...] of residual-branch outputs.
    drop_rate: probability of dropping each example's branch.
    is_training: off at evaluation time (no drops).
    scale: a factor broadcastable to x, combined with the drop mask in
      float32 and cast to x's dtype once.
    scale_by_keep: divide kept branches by `1 - drop_rate`.

  Returns:
    x * scale, with a random subset of examples zeroed (and, with
    `scale_by_keep`, the rest divided by the keep probability).
  """
  scale = jnp.asarray(scale, jnp.float32)
  if is_training and drop_rate > 0.0:
    keep = 1.0 - drop_rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(hk.next_rng_key(), keep, shape)
    mask = mask.astype(jnp.float32)
    scale = scale * (mask / keep if scale_by_keep else mask)
  return x * scale.astype(x.dtype)


def signal_metrics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Average channel squared mean and average channel variance (for SPPs).

  Statistics over batch and space for each channel, averaged over channels,
  in float32 (ICLR 2021, Sec. 3).

  Args:
    x: activations [N, H, W, C].

  Returns:
    (average channel squared mean, average channel variance).
  """
  x = x.astype(jnp.float32)
  return (jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
          jnp.mean(jnp.var(x, axis=(0, 1, 2))))


def symmetric_padding(kernel: int, stride: int) -> tuple[int, int]:
  """timm's `get_padding`: `((stride - 1) + (kernel - 1)) // 2` on each side.

  Unlike SAME, the padding is the same before and after, so a strided conv
  of an even-sized input starts one pixel earlier (PyTorch's convention).
  """
  pad = ((stride - 1) + (kernel - 1)) // 2
  return pad, pad


class ScaledStdConv2D(hk.Module):
  """timm's `ScaledStdConv2d`: Scaled WS with the activation's gamma folded in.

  `W_hat = gain * gamma * (W - mean) / sqrt(N * (var + eps))` per output
  channel over its fan-in N (the variance is the biased one, `eps` is added
  to it, not a floor), computed in float32; then a conv with symmetric
  padding (`symmetric_padding`), not SAME, so it runs through XLA's own
  convolution and gradients (`nfnets.ops.conv`'s polyphase fast path is for
  SAME padding). timm's NFNets fold the scaled activation's gamma into every
  conv instead of scaling the activations (`gamma_in_act=False`).

  Parameters `w` [kh, kw, in/groups, out] (fan-in normal, as timm's
  `kaiming_normal_(mode='fan_in', nonlinearity='linear')`), `gain` [out]
  (init `gain_init`: 0 zero-initialises a residual branch's last conv, timm's
  `skipinit=False`) and `b` [out] (init 0). timm's `weight` [out, in/groups,
  kh, kw], `gain` [out, 1, 1, 1] and `bias` hold the same numbers.
  With `standardize=False`, a plain conv with kernel `gain * gamma * W`.
  """

  def __init__(self, output_channels: int, kernel_shape: int = 1,
               stride: int = 1, feature_group_count: int = 1,
               gamma: float = 1.0, eps: float = 1e-5, gain_init: float = 1.0,
               standardize: bool = True, name: Optional[str] = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = kernel_shape
    self.stride = stride
    self.feature_group_count = feature_group_count
    self.gamma = gamma
    self.eps = eps
    self.gain_init = gain_init
    self.standardize = standardize

  def __call__(self, x: jax.Array) -> jax.Array:
    in_ch, groups, k = x.shape[-1], self.feature_group_count, self.kernel_shape
    if in_ch % groups or self.output_channels % groups:
      raise ValueError(
          f"{self.module_name}: {in_ch} input and {self.output_channels} "
          f"output channels must both divide into {groups} groups")
    shape = (k, k, in_ch // groups, self.output_channels)
    w = hk.get_parameter("w", shape, init=fan_in_normal)
    gain = hk.get_parameter("gain", (self.output_channels,),
                            init=hk.initializers.Constant(self.gain_init))
    bias = hk.get_parameter("b", (self.output_channels,), init=jnp.zeros)
    w = w.astype(jnp.float32)
    scale = gain.astype(jnp.float32) * self.gamma
    if self.standardize:
      mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
      var = jnp.mean(jnp.square(w - mean), axis=(0, 1, 2), keepdims=True)
      kernel = (w - mean) * jax.lax.rsqrt(var + self.eps) * (
          scale / np.sqrt(np.prod(shape[:-1])))
    else:
      kernel = w * scale
    out = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.stride, self.stride),
        (symmetric_padding(k, self.stride),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)
    return out + bias.astype(out.dtype)


class EfficientChannelAttention(hk.Module):
  """ECA (Wang et al., CVPR 2020), as timm's `EcaModule`: the channel gate.

  Global mean, a 1D conv across channels (no bias; kernel size from the
  channel count: `t = int((log2(C) + 1) / 2)`, the next odd number, at least
  3), sigmoid. Returns the gate [N, 1, 1, C] like `SqueezeExcite`. The conv
  is the submodule `conv`, kernel `w` [k, 1, 1] (timm's `conv.weight`
  [1, 1, k] transposed), initialised as PyTorch's default Conv1d.
  """

  def __init__(self, channels: int, name: Optional[str] = None):
    super().__init__(name=name)
    t = int(abs(math.log(channels, 2) + 1) / 2)
    self.kernel_size = max(t if t % 2 else t + 1, 3)
    self.conv = hk.Conv1D(
        1, self.kernel_size, padding="SAME", with_bias=False,
        w_init=hk.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
        name="conv")

  def __call__(self, x: jax.Array) -> jax.Array:
    # The channels are the 1D conv's length axis, with one feature.
    h = self.conv(jnp.mean(x, axis=(1, 2))[:, :, None])
    return jax.nn.sigmoid(h[:, :, 0])[:, None, None, :]


class ConvSqueezeExcite(hk.Module):
  """Squeeze-excite with 1x1 convs `fc1`, `fc2`, as timm's `SEModule`.

  The same computation as `SqueezeExcite` (mean, ReLU, sigmoid; returns the
  gate), with timm's module names and kernel layout: `fc1/w` [1, 1, C, hidden]
  and `b`, `fc2/w` [1, 1, hidden, C] and `b`, fan-in normal, as timm inits
  every conv of its NFNets.
  """

  def __init__(self, channels: int, hidden_channels: int,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.fc1 = hk.Conv2D(hidden_channels, 1, w_init=fan_in_normal, name="fc1")
    self.fc2 = hk.Conv2D(channels, 1, w_init=fan_in_normal, name="fc2")

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2), keepdims=True)
    return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(h))))
