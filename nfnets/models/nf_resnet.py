"""NF-ResNets: pre-activation bottleneck ResNets without normalization.

Brock, De, Smith. "Characterizing signal propagation to close the performance
gap in unnormalized ResNets." ICLR 2021, Sec. 4: Scaled WS convs, gamma-scaled
ReLU, `h + alpha * f(h / beta)` residual blocks with `skip_gain` init 0, and
the projection shortcut taken from the normalised input at transitions.
"""

from typing import Optional, Union

import haiku as hk
import jax

from nfnets import layers
from nfnets.models import common

# Blocks per stage by depth (He et al. 2016; 26 and 288 as in the paper,
# 600 as in the released code's `NF_ResNet.variant_dict`).
DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    288: (24, 24, 24, 24),
    600: (50, 50, 50, 50),
}
WIDTHS = (256, 512, 1024, 2048)
STRIDES = (1, 2, 2, 2)
STEM_STRIDE = 4
TOTAL_STRIDE = 32  # 7x7 conv and max pool, then three strided stages


def check_depth(depth: int) -> tuple[int, int, int, int]:
  if depth not in DEPTHS:
    raise ValueError(f"unknown ResNet depth {depth}; valid: "
                     f"{', '.join(map(str, DEPTHS))}")
  return DEPTHS[depth]


class NFResBlock(hk.Module):
  """Pre-activation bottleneck: `h + alpha * skip_gain * f(act(h) * beta)`.

  With `se_ratio` > 0 the branch ends in squeeze-excite applied as
  `2 * gate * x` before stochastic depth, as the released code's
  `NFResBlock` does with `use_se=True`. Dilated (`common.stage_layout`),
  `conv1` takes `first_dilation` and a dilated stage's first block keeps its
  (stride-1) shortcut conv.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               beta: float, alpha: float, activation: layers.Activation,
               drop_rate: float, standardize: bool, se_ratio: float = 0.0,
               scale_by_keep: bool = False, first_dilation: int = 1,
               dilation: int = 1, name: Optional[str] = None):
    super().__init__(name=name)
    self.first_dilation = first_dilation
    self.beta = beta
    self.alpha = alpha
    self.activation = activation
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep
    width = out_channels // 4
    conv = lambda ch, k, **kw: layers.WSConv2D(  # pylint: disable=g-long-lambda
        ch, k, standardize=standardize, **kw)
    self.conv0 = conv(width, 1, name="conv0")
    self.conv1 = conv(width, 3, stride=stride, name="conv1")
    self.conv2 = conv(out_channels, 1, name="conv2")
    self.conv_shortcut = None
    if stride > 1 or dilation != first_dilation or in_channels != out_channels:
      self.conv_shortcut = conv(out_channels, 1, stride=stride,
                                name="conv_shortcut")
    self.se = None
    if se_ratio > 0:
      # Hidden width from the block's output, as the released code's
      # `SqueezeExcite(out_ch, out_ch, se_ratio)`.
      self.se = layers.SqueezeExcite(
          out_channels, max(1, int(out_channels * se_ratio)),
          name="squeeze_excite")

  def __call__(self, x: jax.Array,
               is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.activation(x) * self.beta
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.conv0(out)
    out = common.dilated(self.conv1, self.activation(out),
                         self.first_dilation)
    out = self.conv2(self.activation(out))
    return common.residual_end(
        out, shortcut, se=self.se, alpha=self.alpha, drop_rate=self.drop_rate,
        scale_by_keep=self.scale_by_keep, is_training=is_training)


class NFResNet(hk.Module):
  """NF-ResNet-26 to -600 classifier (NHWC input); `remat` as for NFNet.

  `use_se` adds squeeze-excite (hidden width `se_ratio` of each block's
  output) to every block; `drop_path_scale_by_keep` and `fc_init_std` are as
  for NFNet (defaults: the released code's no rescaling and N(0, 0.01^2)),
  and so are the backbone options (`num_classes=0`, `output_stride`,
  `return_features`); it has no final conv.
  """

  def __init__(self, num_classes: int = 1000, depth: int = 50, *,
               width_multiplier: float = 1.0,
               activation: Union[str, layers.Activation] = "relu",
               alpha: float = 0.2, drop_path_rate: float = 0.1,
               drop_path_scale_by_keep: bool = False,
               dropout_rate: float = 0.25, use_se: bool = False,
               se_ratio: float = 0.25, fc_init_std: float = 0.01,
               standardize: bool = True, remat: bool = False,
               output_stride: int = TOTAL_STRIDE, name: str = "NFResNet"):
    super().__init__(name=name)
    self.remat = remat
    depths = check_depth(depth)
    layout = common.stage_layout(STRIDES, STEM_STRIDE, output_stride)
    self.output_stride = output_stride
    widths = [int(w * width_multiplier) for w in WIDTHS]
    if min(widths) < 4:
      raise ValueError(f"width_multiplier {width_multiplier} leaves a stage "
                       "with fewer than 4 channels")
    if use_se and se_ratio <= 0:
      raise ValueError(f"use_se needs a positive se_ratio, got {se_ratio}")
    self.dropout_rate = dropout_rate
    self.activation = layers.scaled_activation(activation)
    self.stem = layers.WSConv2D(widths[0] // 4, 7, stride=2,
                                standardize=standardize, name="initial_conv")
    self.blocks, self.block_stages = [], []
    in_ch, expected_std, index, total = widths[0] // 4, 1.0, 0, sum(depths)
    for stage, (width, count) in enumerate(zip(widths, depths)):
      for j in range(count):
        self.blocks.append(NFResBlock(
            in_ch, width, **layout[stage].block(j),
            beta=1.0 / expected_std, alpha=alpha, activation=self.activation,
            drop_rate=drop_path_rate * index / total,
            scale_by_keep=drop_path_scale_by_keep,
            se_ratio=se_ratio if use_se else 0.0, standardize=standardize))
        self.block_stages.append(stage)
        expected_std = ((1.0 if j == 0 else expected_std ** 2) +
                        alpha ** 2) ** 0.5
        in_ch, index = width, index + 1
    self.classifier = common.classifier(num_classes, fc_init_std)
    self.feature_info = common.feature_info(widths[0] // 4, STEM_STRIDE,
                                            widths, layout)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network; see `NFNet.__call__` for the arguments."""
    common.check_image(images, self.output_stride)
    out = hk.max_pool(self.stem(images), (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    return common.blocks_and_head(self, out, is_training, return_metrics,
                                  return_features)
