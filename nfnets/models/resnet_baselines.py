"""SkipInit and Fixup ResNets: the NF-ResNet paper's unnormalized baselines.

Brock, De, Smith, ICLR 2021, compare NF-ResNets with two ways of training a
ResNet without normalization by making every residual block the identity at
initialization:

- SkipInit (De & Smith, "Batch normalization biases residual blocks towards
  the identity function in deep networks", NeurIPS 2020): a pre-activation
  bottleneck ResNet with plain convs (with biases) whose residual branch ends
  in a learnable scalar `skip_gain` initialised to 0.
- Fixup (Zhang, Dauphin, Ma, "Fixup initialization: residual learning without
  normalization", ICLR 2019): a post-activation bottleneck ResNet without conv
  biases, with scalar biases before each conv and activation, a scalar
  multiplier at the branch's end, the branch's last conv and the classifier
  initialised to zero and the other branch convs' He init scaled by
  `L^{-1/(2m-2)} = L^{-1/4}` (L residual blocks, m = 3 convs per branch).

Both follow the released code (google-deepmind/deepmind-research,
`nfnets/skipinit_resnet.py` and `nfnets/fixup_resnet.py`): its module names,
so the parameter trees read like its own (`SkipInit_ResNet/~/nf_res_block/~/
conv0`, `FixUp_ResNet/~/res_block_3`), its initializers and its stochastic
depth (block `j` of `n` drops at `drop_path_rate * j / n`, kept branches not
rescaled). The released code has no dropout default (its `drop_rate=None`
looks up a key its variant table lacks); here it is 0.25, NFResNet's default,
as is the stochastic-depth rate 0.1, so that the defaults regularise alike.
Depths are NFResNet's (`nf_resnet.DEPTHS`); 26 is not in the released tables.
"""

from typing import Callable, Iterator, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers
from nfnets.models import common
from nfnets.models import nf_resnet

# The released code's unscaled nonlinearities (no gamma: nothing here relies
# on unit-variance activations).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "identity": lambda x: x,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; valid: "
                     f"{', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _block_layout(depth: int, width_multiplier: float,
                  layout: list[common.StageLayout]) -> Iterator[
                      tuple[int, int, int, dict[str, int], int, int]]:
  """(stage, in_channels, out_channels, strides and dilations, index,
  total) of each block."""
  depths = nf_resnet.check_depth(depth)
  widths = _widths(width_multiplier)
  in_ch, index, total = widths[0] // 4, 0, sum(depths)
  for stage, (width, count) in enumerate(zip(widths, depths)):
    for j in range(count):
      yield stage, in_ch, width, layout[stage].block(j), index, total
      in_ch, index = width, index + 1


def _widths(width_multiplier: float) -> list[int]:
  widths = [int(w * width_multiplier) for w in nf_resnet.WIDTHS]
  if min(widths) < 4:
    raise ValueError(f"width_multiplier {width_multiplier} leaves a stage "
                     "with fewer than 4 channels")
  return widths


def _scalar(name: str, dtype, init=jnp.zeros) -> jax.Array:
  # float32 master value, used in the compute dtype: a float32 scalar array
  # would promote bfloat16 activations to float32.
  return hk.get_parameter(name, (), init=init).astype(dtype)


class SkipInitBlock(hk.Module):
  """Pre-activation bottleneck `h + skip_gain * f(relu(h))`, skip_gain = 0.

  Plain convs with biases (Haiku's default truncated-normal fan-in init), the
  projection shortcut taken from the activated input, as the released
  `skipinit_resnet.NFResBlock` (hence the default module name).
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               activation: Callable[[jax.Array], jax.Array],
               drop_rate: float, scale_by_keep: bool = False,
               first_dilation: int = 1, dilation: int = 1,
               name: Optional[str] = "nf_res_block"):
    super().__init__(name=name)
    width = out_channels // 4
    self.first_dilation = first_dilation
    self.activation = activation
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep
    self.conv0 = hk.Conv2D(width, 1, name="conv0")
    self.conv1 = hk.Conv2D(width, 3, stride=stride, name="conv1")
    self.conv2 = hk.Conv2D(out_channels, 1, name="conv2")
    self.conv_shortcut = None
    if stride > 1 or dilation != first_dilation or in_channels != out_channels:
      self.conv_shortcut = hk.Conv2D(out_channels, 1, stride=stride,
                                     name="conv_shortcut")

  def __call__(self, x: jax.Array,
               is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.activation(x)
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.conv0(out)
    out = common.dilated(self.conv1, self.activation(out),
                         self.first_dilation)
    out = self.conv2(self.activation(out))
    # alpha = 1: SkipInit has no residual scale besides its gain.
    return common.residual_end(
        out, shortcut, se=None, alpha=1.0, drop_rate=self.drop_rate,
        scale_by_keep=self.scale_by_keep, is_training=is_training)


def fixup_rescale(num_blocks: int, convs_per_branch: int = 3) -> float:
  """Fixup's factor on the branch convs' init std: `L^{-1/(2m-2)}`.

  Zhang et al. 2019, Sec. 3 (rule 2): L residual branches of m layers each.
  """
  return num_blocks ** (-1.0 / (2 * convs_per_branch - 2))


def _normal_conv(channels: int, kernel: int, std: float, stride: int = 1,
                 name: Optional[str] = None) -> hk.Conv2D:
  return hk.Conv2D(channels, kernel, stride=stride, with_bias=False,
                   w_init=hk.initializers.RandomNormal(std), name=name)


class FixupBlock(hk.Module):
  """Post-activation Fixup bottleneck `relu(shortcut(h + b1a) + branch)`.

  branch = `scale * conv2(relu(conv1(relu(conv0(h + b1a) + b1b) + b2a) + b2b)
  + b3a) + b3b`, with scalar biases (init 0) and `scale` (init 1), conv2 zero
  at init. As the released `fixup_resnet.ResBlock`, the He stds count each
  conv's outputs (`sqrt(2 / (out_channels * k^2))`; for the 3x3 conv that is
  also its fan-in) and conv0 and conv1 are scaled by `fixup_rescale`.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               num_blocks: int, activation: Callable[[jax.Array], jax.Array],
               drop_rate: float, scale_by_keep: bool = False,
               first_dilation: int = 1, dilation: int = 1,
               name: Optional[str] = "res_block"):
    super().__init__(name=name)
    width = out_channels // 4
    self.first_dilation = first_dilation
    rescale = fixup_rescale(num_blocks)
    self.activation = activation
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep
    self.conv0 = _normal_conv(width, 1, (2 / width) ** 0.5 * rescale,
                              name="conv0")
    self.conv1 = _normal_conv(width, 3, (2 / (9 * width)) ** 0.5 * rescale,
                              stride, name="conv1")
    self.conv2 = hk.Conv2D(out_channels, 1, with_bias=False, w_init=jnp.zeros,
                           name="conv2")
    self.conv_shortcut = None
    if stride > 1 or dilation != first_dilation or in_channels != out_channels:
      self.conv_shortcut = _normal_conv(out_channels, 1,
                                        (2 / out_channels) ** 0.5, stride,
                                        name="conv_shortcut")

  def __call__(self, x: jax.Array,
               is_training: bool) -> tuple[jax.Array, jax.Array]:
    bias = {n: _scalar(n, x.dtype) for n in
            ("bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "bias3b")}
    scale = _scalar("scale", x.dtype, jnp.ones)
    x = x + bias["bias1a"]
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    out = self.activation(self.conv0(x) + bias["bias1b"])
    out = self.activation(common.dilated(
        self.conv1, out + bias["bias2a"], self.first_dilation) +
                          bias["bias2b"])
    out = self.conv2(out + bias["bias3a"]) * scale + bias["bias3b"]
    _, res_var = layers.signal_metrics(out)
    out = layers.stochastic_depth(out, self.drop_rate, is_training,
                                  scale_by_keep=self.scale_by_keep)
    return self.activation(out + shortcut), res_var


def _skipinit_block(in_channels: int, out_channels: int, *, num_blocks: int,
                    **kwargs) -> SkipInitBlock:
  del num_blocks  # SkipInit's init does not depend on the depth.
  return SkipInitBlock(in_channels, out_channels, **kwargs)


class _BaselineResNet(hk.Module):
  """What both share: stem conv, the block list, the classifier, the
  backbone options (as for NFNet: `num_classes=0`, `output_stride`)."""

  def __init__(self, make_block: Callable[..., hk.Module], num_classes: int,
               depth: int, width_multiplier: float, activation: str,
               drop_path_rate: float, drop_path_scale_by_keep: bool,
               dropout_rate: float, fc_init_std: float, remat: bool,
               output_stride: int, name: str):
    super().__init__(name=name)
    self.remat = remat
    self.dropout_rate = dropout_rate
    self.activation = _activation(activation)
    self.output_stride = output_stride
    stages = common.stage_layout(nf_resnet.STRIDES, nf_resnet.STEM_STRIDE,
                                 output_stride)
    layout = list(_block_layout(depth, width_multiplier, stages))
    self.stem = hk.Conv2D(layout[0][1], 7, stride=2, with_bias=False,
                          name="initial_conv")
    self.blocks, self.block_stages = [], []
    for stage, in_ch, out_ch, strides, index, total in layout:
      self.blocks.append(make_block(
          in_ch, out_ch, **strides, num_blocks=total,
          activation=self.activation,
          drop_rate=drop_path_rate * index / total,
          scale_by_keep=drop_path_scale_by_keep))
      self.block_stages.append(stage)
    # Zero weights by default (the released `fc_init=jnp.zeros`).
    self.classifier = common.classifier(num_classes, fc_init_std)
    self.feature_info = common.feature_info(
        layout[0][1], nf_resnet.STEM_STRIDE, _widths(width_multiplier),
        stages)

  @hk.transparent
  def _pool_and_blocks(self, out: jax.Array, is_training: bool,
                       collected: dict[str, jax.Array]):
    out = collected["stem"] = hk.max_pool(out, (1, 3, 3, 1), (1, 2, 2, 1),
                                          "SAME")
    return common.apply_blocks(self.blocks, self.block_stages, out,
                               is_training, self.remat, collected)


class SkipInitResNet(_BaselineResNet):
  """SkipInit ResNet-26 to -600 classifier (NHWC input).

  The stem conv has no bias; the head is `linear(mean(relu(h)))` with
  dropout. `remat` as for NFNet.
  """

  def __init__(self, num_classes: int = 1000, depth: int = 50, *,
               width_multiplier: float = 1.0, activation: str = "relu",
               drop_path_rate: float = 0.1,
               drop_path_scale_by_keep: bool = False,
               dropout_rate: float = 0.25, fc_init_std: float = 0.0,
               remat: bool = False,
               output_stride: int = nf_resnet.TOTAL_STRIDE,
               name: str = "SkipInit_ResNet"):
    super().__init__(_skipinit_block, num_classes, depth, width_multiplier,
                     activation, drop_path_rate, drop_path_scale_by_keep,
                     dropout_rate, fc_init_std, remat, output_stride, name)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network; see `NFNet.__call__` for the arguments."""
    common.check_image(images, self.output_stride)
    collected = {}
    out, metrics = self._pool_and_blocks(self.stem(images), is_training,
                                         collected)
    output = common.classify(self.activation(out), self.classifier,
                             self.dropout_rate, is_training, collected)
    return common.outputs(output, metrics, collected, return_metrics,
                          return_features)


class FixupResNet(_BaselineResNet):
  """Fixup ResNet-26 to -600 classifier (NHWC input).

  Stem `relu(conv(x) + bias1)` (conv without bias), then max pool; head
  `linear(dropout(mean(h)) + bias2)`, its weights zero. `remat` as for NFNet.
  The scalar `bias1` is in the `stem` parameter group, `bias2` in `head`
  (absent when headless).
  """

  root_parameter_groups = {"bias1": common.STEM, "bias2": common.HEAD}

  def __init__(self, num_classes: int = 1000, depth: int = 50, *,
               width_multiplier: float = 1.0, activation: str = "relu",
               drop_path_rate: float = 0.1,
               drop_path_scale_by_keep: bool = False,
               dropout_rate: float = 0.25, fc_init_std: float = 0.0,
               remat: bool = False,
               output_stride: int = nf_resnet.TOTAL_STRIDE,
               name: str = "FixUp_ResNet"):
    super().__init__(FixupBlock, num_classes, depth, width_multiplier,
                     activation, drop_path_rate, drop_path_scale_by_keep,
                     dropout_rate, fc_init_std, remat, output_stride, name)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network; see `NFNet.__call__` for the arguments."""
    common.check_image(images, self.output_stride)
    out = self.stem(images)
    out = self.activation(out + _scalar("bias1", out.dtype))
    collected = {}
    out, metrics = self._pool_and_blocks(out, is_training, collected)
    # The blocks end in the activation: the head pools `out` as it is.
    head = None
    if self.classifier is not None:
      bias2 = _scalar("bias2", out.dtype)
      head = lambda pooled: self.classifier(pooled + bias2)
    output = common.classify(out, head, self.dropout_rate, is_training,
                             collected)
    return common.outputs(output, metrics, collected, return_metrics,
                          return_features)
