"""NF-RegNet B0-B8: normalizer-free RegNets with EfficientNet-style scaling.

Brock, De, Smith. "Characterizing signal propagation to close the performance
gap in unnormalized ResNets." ICLR 2021 (its NF-RegNets): RegNetY-style
inverted bottlenecks (1x1 expansion, grouped 3x3 with squeeze-excite, 1x1
projection) with Scaled WS, scaled SiLU, `h + alpha * f(h / beta)` residual
blocks and `skip_gain` init 0. Widths, depths, resolutions and dropout per
variant, the module paths (`NF_RegNet/~/nf_block_3/~/conv1/w`, ...) and
everything not in the paper follow DeepMind's released code
(google-deepmind/deepmind-research `nfnets/nf_regnet.py` and the
`nf_regnet_params` table of `nfnets/base.py`).
"""

import dataclasses
from typing import Optional, Sequence, Union

import haiku as hk
import jax

from nfnets import layers
from nfnets.models import common


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the released code's `nf_regnet_params` table."""
  widths: tuple[int, int, int, int]  # before the width multiplier
  depths: tuple[int, int, int, int]
  train_image_size: int
  test_image_size: int
  dropout_rate: float


VARIANTS: dict[str, Variant] = {
    "B0": Variant((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    "B1": Variant((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    "B2": Variant((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    "B3": Variant((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    "B4": Variant((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    "B5": Variant((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    "B6": Variant((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    "B7": Variant((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    "B8": Variant((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
}
# Every stage, the first included, starts with a stride-2 block after the
# stride-2 stem.
STRIDES = (2, 2, 2, 2)
STEM_STRIDE = 2
TOTAL_STRIDE = 32
# The head's 1x1 conv widens the last stage as EfficientNet-B0's does
# (320 -> 1280); the released code's `int(1280 * ch // 440)`.
FINAL_CONV_WIDTH, FINAL_CONV_BASE = 1280, 440


def parse_variant(variant: str) -> Variant:
  """Maps 'B0' ... 'B8' (any case) to its table row."""
  if variant.upper() not in VARIANTS:
    raise ValueError(f"unknown NF-RegNet variant {variant!r}; valid: "
                     f"{', '.join(VARIANTS)}")
  return VARIANTS[variant.upper()]


def bottleneck_width(in_channels: int, expansion: float,
                     group_width: int) -> int:
  """A block's expanded width: `expansion` of its input, in whole groups.

  As the released `NFBlock`: `int(in_ch * expansion)` rounded down to a
  multiple of the group width (the expansion is of the block's input, not
  its output as in NFNets).
  """
  return int(in_channels * expansion) // group_width * group_width


class NFRegNetBlock(hk.Module):
  """The NF-RegNet block: `h + alpha * skip_gain * f(act(h) * beta)`.

  The branch is a 1x1 expansion conv, a grouped 3x3 conv (strided),
  squeeze-excite on the expanded width applied as `2 * gate * x` (hidden
  width `se_ratio` of the expanded width), then act and a 1x1 projection
  conv; per-example stochastic depth follows. A strided block's shortcut is
  2x2 average pooling then a 1x1 conv of the normalised input, a widening
  block's a 1x1 conv of it, else identity (the released `NFBlock`).
  Dilated (`common.stage_layout`), `conv1` takes `first_dilation`, and a
  dilated stage's first block keeps its shortcut conv, without the pool.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               expansion: float, group_width: int, se_ratio: float,
               beta: float, alpha: float, activation: layers.Activation,
               drop_rate: float, standardize: bool,
               scale_by_keep: bool = False, first_dilation: int = 1,
               dilation: int = 1, name: Optional[str] = None):
    super().__init__(name=name)
    self.stride = stride
    self.first_dilation = first_dilation
    self.beta = beta
    self.alpha = alpha
    self.activation = activation
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep
    width = bottleneck_width(in_channels, expansion, group_width)
    if width < 1:
      raise ValueError(
          f"a block of {in_channels} input channels with expansion "
          f"{expansion} is narrower than the group width {group_width}; "
          "raise the width multiplier or lower the group width")
    conv = lambda ch, k, **kw: layers.WSConv2D(  # pylint: disable=g-long-lambda
        ch, k, standardize=standardize, **kw)
    self.conv0 = conv(width, 1, name="conv0")
    self.conv1 = conv(width, 3, stride=stride,
                      feature_group_count=width // group_width, name="conv1")
    self.conv2 = conv(out_channels, 1, name="conv2")
    self.conv_shortcut = None
    if stride > 1 or dilation != first_dilation or in_channels != out_channels:
      self.conv_shortcut = conv(out_channels, 1, name="conv_shortcut")
    self.se = layers.SqueezeExcite(width, max(1, int(width * se_ratio)),
                                   name="squeeze_excite")

  def __call__(self, x: jax.Array,
               is_training: bool) -> tuple[jax.Array, jax.Array]:
    """Returns the block output and the residual branch's average variance."""
    out, shortcut = common.pooled_shortcut_start(
        x, activation=self.activation, beta=self.beta, stride=self.stride,
        conv_shortcut=self.conv_shortcut)
    out = self.conv0(out)
    out = common.dilated(self.conv1, self.activation(out),
                         self.first_dilation)
    # SE sits inside the branch here, not at its end as in NFNets.
    out = 2.0 * self.se(out).astype(out.dtype) * out
    out = self.conv2(self.activation(out))
    return common.residual_end(
        out, shortcut, se=None, alpha=self.alpha, drop_rate=self.drop_rate,
        scale_by_keep=self.scale_by_keep, is_training=is_training)


class NFRegNet(hk.Module):
  """NF-RegNet B0-B8 image classifier (NHWC input).

  The defaults are the released code's: `width_multiplier` 0.75 of the
  table's widths, `expansion` 2.25 (1 for the network's first block, as in
  EfficientNet), `group_width` 8 channels per group (the released
  `group_size`), `se_ratio` 0.5, `alpha` 0.2, stochastic depth 0.1 (block
  `i` of `n` drops with rate `0.1 * i / n`, kept branches not rescaled
  unless `drop_path_scale_by_keep`), scaled SiLU, a final 1x1 conv of
  `1280 / 440` times the last stage's width and a zero-initialised
  classifier (`fc_init_std=0`). `dropout_rate` None takes the variant's.
  `depths` replaces the variant's blocks per stage (for tiny test models),
  `standardize=False` gives plain convs and `remat=True` recomputes block
  activations in the backward pass (`common.apply_blocks`). Backbone
  options (`num_classes=0`, `output_stride`, `return_features`) as for
  NFNet; the stem's features are at stride 2.
  """

  def __init__(self, num_classes: int = 1000, variant: str = "B0", *,
               width_multiplier: float = 0.75, expansion: float = 2.25,
               group_width: int = 8, se_ratio: float = 0.5,
               depths: Optional[Sequence[int]] = None,
               activation: Union[str, layers.Activation] = "silu",
               alpha: float = 0.2, drop_path_rate: float = 0.1,
               drop_path_scale_by_keep: bool = False,
               dropout_rate: Optional[float] = None,
               fc_init_std: float = 0.0, standardize: bool = True,
               remat: bool = False, output_stride: int = TOTAL_STRIDE,
               name: str = "NF_RegNet"):
    super().__init__(name=name)
    self.remat = remat
    row = parse_variant(variant)
    layout = common.stage_layout(STRIDES, STEM_STRIDE, output_stride)
    self.output_stride = output_stride
    depths = tuple(depths) if depths is not None else row.depths
    if len(depths) != len(row.depths) or min(depths) < 1:
      raise ValueError(f"depths must be 4 positive block counts, got {depths}")
    if width_multiplier <= 0 or expansion <= 0 or group_width < 1:
      raise ValueError(
          "width_multiplier, expansion and group_width must be positive, got "
          f"{width_multiplier}, {expansion} and {group_width}")
    if se_ratio <= 0:
      raise ValueError(f"se_ratio must be positive, got {se_ratio}")
    if not 0 <= drop_path_rate < 1 or not 0 <= alpha:
      raise ValueError(f"bad drop_path_rate {drop_path_rate} or alpha {alpha}")
    widths = [int(w * width_multiplier) for w in row.widths]
    self.dropout_rate = (row.dropout_rate if dropout_rate is None
                         else dropout_rate)
    self.activation = layers.scaled_activation(activation)
    self.stem = layers.WSConv2D(widths[0], 3, stride=2,
                                standardize=standardize, name="initial_conv")
    self.blocks, self.block_stages = [], []
    in_ch, expected_std, index, total = widths[0], 1.0, 0, sum(depths)
    for stage, (width, depth) in enumerate(zip(widths, depths)):
      for j in range(depth):
        self.blocks.append(NFRegNetBlock(
            in_ch, width, **layout[stage].block(j),
            expansion=1.0 if index == 0 else expansion,
            group_width=group_width, se_ratio=se_ratio,
            beta=1.0 / expected_std, alpha=alpha, activation=self.activation,
            drop_rate=drop_path_rate * index / total,
            scale_by_keep=drop_path_scale_by_keep, standardize=standardize,
            # Haiku's own names for the released code's `NFBlock`s.
            name="nf_block" if index == 0 else f"nf_block_{index}"))
        self.block_stages.append(stage)
        # A stage's first block has a conv shortcut of the normalised
        # input, so the expected variance restarts at 1 (ICLR 2021, Sec. 4).
        expected_std = ((1.0 if j == 0 else expected_std ** 2) +
                        alpha ** 2) ** 0.5
        in_ch, index = width, index + 1
    final_width = FINAL_CONV_WIDTH * in_ch // FINAL_CONV_BASE
    self.final_conv = layers.WSConv2D(final_width, 1,
                                      standardize=standardize,
                                      name="final_conv")
    self.classifier = common.classifier(num_classes, fc_init_std)
    self.feature_info = common.feature_info(widths[0], STEM_STRIDE, widths,
                                            layout, final_width)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network; see `NFNet.__call__` for the arguments."""
    common.check_image(images, self.output_stride)
    return common.blocks_and_head(self, self.stem(images), is_training,
                                  return_metrics, return_features)
