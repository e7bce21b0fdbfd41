"""NFNet F0-F7 (and F0+ to F7+): normalizer-free SE-ResNeXt-D networks.

Brock, De, Smith, Simonyan. "High-Performance Large-Scale Image Recognition
Without Normalization." ICML 2021, Sec. 5 and App. C. Module paths and
parameter names follow the released DeepMind checkpoints
(`NFNet/~/nf_block_3/~/conv1b/w`, ...), so those files load unchanged.
"""

import dataclasses
from typing import Optional, Sequence, Union

import haiku as hk
import jax

from nfnets import layers
from nfnets.models import common


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the NFNet variant table (ICML 2021, Table 1 and App. C)."""
  depths: tuple[int, ...]
  train_image_size: int
  test_image_size: int
  dropout_rate: float
  randaugment: tuple[int, int]  # (layers, magnitude)


def _variant(k: int) -> Variant:
  train = (192, 224, 256, 320, 384, 416, 448, 480)[k]
  test = (256, 320, 352, 416, 512, 544, 576, 608)[k]
  dropout = (0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5)[k]
  magnitude = (5, 10, 10, 15, 15, 15, 15, 15)[k]
  return Variant(tuple(d * (k + 1) for d in (1, 2, 6, 3)), train, test,
                 dropout, (4, magnitude))


VARIANTS: dict[str, Variant] = {f"F{k}": _variant(k) for k in range(8)}
WIDTHS = (256, 512, 1536, 1536)
PLUS_WIDTHS = (384, 768, 2048, 2048)
STRIDES = (1, 2, 2, 2)
STEM_STRIDE = 4
TOTAL_STRIDE = 32  # stem 4 x three strided stages
# The released code's defaults: `group_pattern`, `final_conv_mult`.
GROUP_WIDTH = 128
FINAL_CONV_MULT = 2.0


def parse_variant(variant: str) -> tuple[Variant, tuple[int, ...]]:
  """Maps 'F0' ... 'F7' and 'F0+' ... 'F7+' to (table row, stage widths)."""
  base = variant.upper().removesuffix("+")
  if base not in VARIANTS:
    valid = [f"F{k}" for k in range(8)] + [f"F{k}+" for k in range(8)]
    raise ValueError(f"unknown NFNet variant {variant!r}; valid: "
                     f"{', '.join(valid)}")
  return VARIANTS[base], (PLUS_WIDTHS if variant.endswith("+") else WIDTHS)


def bottleneck_width(out_channels: int, group_width: int,
                     expansion: float = 0.5) -> int:
  """An NFNet block's grouped-conv width: `expansion` of its output.

  Rounded down to whole groups, as the released code's `int(out_ch *
  expansion)` is.
  """
  return int(out_channels * expansion) // group_width * group_width


def per_stage(value, option: str) -> tuple:
  """One value per stage, from one value for all or a sequence of 4."""
  if not isinstance(value, Sequence) or isinstance(value, str):
    return (value,) * len(STRIDES)
  if len(value) != len(STRIDES):
    raise ValueError(f"{option} must be one value or {len(STRIDES)} (one per "
                     f"stage), got {tuple(value)}")
  return tuple(value)


def final_conv_width(last_width: int, final_conv_mult: Optional[float],
                     final_conv_ch: Optional[int]) -> int:
  """The final 1x1 conv's width: `final_conv_ch` if given, else mult x last.

  The released code reads `final_conv_ch` only when `final_conv_mult` is
  None; here a given `final_conv_ch` decides, and a multiplier other than
  None or the default 2 beside it is an error rather than silently ignored.
  """
  if final_conv_ch is not None:
    if final_conv_mult not in (None, FINAL_CONV_MULT):
      raise ValueError(
          f"final_conv_ch={final_conv_ch} and final_conv_mult="
          f"{final_conv_mult} both set the final conv's width; give one")
    if final_conv_ch < 1:
      raise ValueError(f"final_conv_ch must be positive, got {final_conv_ch}")
    return final_conv_ch
  if final_conv_mult is None:
    raise ValueError("final_conv_mult=None needs final_conv_ch")
  width = int(final_conv_mult * last_width)
  if width < 1:
    raise ValueError(f"final_conv_mult {final_conv_mult} leaves the final "
                     "conv with no channels")
  return width


class NFBlock(hk.Module):
  """The NFNet bottleneck block: `h + alpha * skip_gain * f(act(h) * beta)`.

  The branch is 1x1 conv, 3x3 grouped conv (strided), 3x3 grouped conv
  (`conv1b`, absent with `use_two_convs=False`), 1x1 conv, then
  squeeze-excite (`2 * gate * x`) and per-example stochastic depth. A strided
  block's shortcut is 2x2 average pooling then a 1x1 conv of the normalised
  input; a widening block's is a 1x1 conv of it; else identity.

  Dilated (`common.stage_layout`): `conv1` takes `first_dilation` and
  `conv1b` `dilation`; the first block of a dilated stage (stride 1,
  `dilation` > `first_dilation`) keeps its shortcut conv, without the pool.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               beta: float, alpha: float, group_width: int,
               activation: layers.Activation, se_ratio: float,
               drop_rate: float, standardize: bool, expansion: float = 0.5,
               use_two_convs: bool = True, scale_by_keep: bool = False,
               first_dilation: int = 1, dilation: int = 1,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.stride = stride
    self.first_dilation, self.dilation = first_dilation, dilation
    self.beta = beta
    self.alpha = alpha
    self.activation = activation
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep
    width = bottleneck_width(out_channels, group_width, expansion)
    groups = width // group_width
    conv = lambda ch, k, **kw: layers.WSConv2D(  # pylint: disable=g-long-lambda
        ch, k, standardize=standardize, **kw)
    self.conv0 = conv(width, 1, name="conv0")
    self.conv1 = conv(width, 3, stride=stride, feature_group_count=groups,
                      name="conv1")
    self.conv1b = None
    if use_two_convs:
      self.conv1b = conv(width, 3, feature_group_count=groups, name="conv1b")
    self.conv2 = conv(out_channels, 1, name="conv2")
    self.conv_shortcut = None
    if stride > 1 or dilation != first_dilation or in_channels != out_channels:
      self.conv_shortcut = conv(out_channels, 1, name="conv_shortcut")
    self.se = None
    if se_ratio > 0:
      self.se = layers.SqueezeExcite(
          out_channels, max(1, int(out_channels * se_ratio)),
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
    if self.conv1b is not None:
      out = common.dilated(self.conv1b, self.activation(out), self.dilation)
    out = self.conv2(self.activation(out))
    return common.residual_end(
        out, shortcut, se=self.se, alpha=self.alpha, drop_rate=self.drop_rate,
        scale_by_keep=self.scale_by_keep, is_training=is_training)


class NFNet(hk.Module):
  """NFNet F0-F7 / F0+-F7+ image classifier (NHWC input).

  Options beyond the published variants exist for research and tests:
  `width_multiplier` scales the stage widths, `group_width` sets the grouped
  convs' group size in every stage (small values give tiny models) and
  `group_widths` in each stage, `expansion` each stage's bottleneck ratio,
  `depths` the blocks per stage, `use_two_convs=False` drops each block's
  second grouped conv (`conv1b`), `final_conv_ch` / `final_conv_mult` the
  final conv's width, and `standardize=False` replaces WS convs with plain
  ones. These follow the released code's constructor (`group_pattern`,
  `bneck_pattern`, `use_two_convs`, `final_conv_ch`, `final_conv_mult`).
  Stochastic depth does not rescale kept branches, as in the released code;
  `drop_path_scale_by_keep=True` divides them by the keep probability.
  `fc_init_std` is the classifier weights' init std (0: zeros).
  `remat=True` recomputes block activations in the backward pass
  (`apply_blocks`), trading compute for memory: larger batches fit.
  As a backbone (`common`): `num_classes=0` (headless), `output_stride`
  32, 16, 8 or 4, and `return_features` in `__call__`.
  """

  def __init__(self, num_classes: int = 1000, variant: str = "F0", *,
               width_multiplier: float = 1.0,
               group_width: int = GROUP_WIDTH,
               group_widths: Optional[Sequence[int]] = None,
               expansion: Union[float, Sequence[float]] = (0.5,) * 4,
               depths: Optional[Sequence[int]] = None,
               use_two_convs: bool = True,
               activation: Union[str, layers.Activation] = "gelu",
               alpha: float = 0.2, drop_path_rate: float = 0.25,
               drop_path_scale_by_keep: bool = False,
               dropout_rate: Optional[float] = None, se_ratio: float = 0.5,
               final_conv_mult: Optional[float] = FINAL_CONV_MULT,
               final_conv_ch: Optional[int] = None,
               fc_init_std: float = 0.01,
               standardize: bool = True, remat: bool = False,
               output_stride: int = TOTAL_STRIDE, name: str = "NFNet"):
    super().__init__(name=name)
    self.remat = remat
    row, base_widths = parse_variant(variant)
    layout = common.stage_layout(STRIDES, STEM_STRIDE, output_stride)
    self.output_stride = output_stride
    depths = tuple(depths) if depths is not None else row.depths
    if len(depths) != len(STRIDES) or min(depths) < 1:
      raise ValueError(f"depths must be 4 positive block counts, got {depths}")
    if group_widths is not None and group_width != GROUP_WIDTH:
      raise ValueError(
          f"group_width={group_width} and group_widths={tuple(group_widths)} "
          f"both set the group widths; give one (group_width={GROUP_WIDTH} "
          "is the default)")
    group_widths = per_stage(
        group_width if group_widths is None else group_widths, "group_widths")
    expansions = per_stage(expansion, "expansion")
    if width_multiplier <= 0 or min(group_widths) < 1 or min(expansions) <= 0:
      raise ValueError(
          "width_multiplier, group widths and expansions must be positive, "
          f"got {width_multiplier}, {group_widths} and {expansions}")
    widths = [int(w * width_multiplier) for w in base_widths]
    for w, g, e in zip(widths, group_widths, expansions):
      if int(w * e) < g:
        raise ValueError(
            f"width_multiplier {width_multiplier} and expansion {e} give a "
            f"stage of {w} channels whose bottleneck ({int(w * e)}) is "
            f"narrower than the group width {g}; raise the multiplier or "
            "lower the group width")
    if not 0 <= drop_path_rate < 1 or not 0 <= alpha:
      raise ValueError(f"bad drop_path_rate {drop_path_rate} or alpha {alpha}")
    self.num_classes = num_classes
    self.dropout_rate = (row.dropout_rate if dropout_rate is None
                         else dropout_rate)
    self.activation = layers.scaled_activation(activation)
    conv = lambda ch, k, **kw: layers.WSConv2D(  # pylint: disable=g-long-lambda
        ch, k, standardize=standardize, **kw)
    self.stem = [
        conv(16, 3, stride=2, name="stem_conv0"),
        conv(32, 3, name="stem_conv1"),
        conv(64, 3, name="stem_conv2"),
        conv(widths[0] // 2, 3, stride=2, name="stem_conv3"),
    ]
    self.blocks = []
    self.block_stages = []
    in_ch, expected_std, index, total = widths[0] // 2, 1.0, 0, sum(depths)
    for stage, (width, depth) in enumerate(zip(widths, depths)):
      for j in range(depth):
        self.blocks.append(NFBlock(
            in_ch, width, **layout[stage].block(j),
            beta=1.0 / expected_std, alpha=alpha,
            group_width=group_widths[stage], expansion=expansions[stage],
            use_two_convs=use_two_convs, activation=self.activation,
            se_ratio=se_ratio, drop_rate=drop_path_rate * index / total,
            scale_by_keep=drop_path_scale_by_keep, standardize=standardize))
        self.block_stages.append(stage)
        # The first block's shortcut is a conv of the normalised input, so
        # the variance restarts at 1 (ICML 2021, Sec. 3).
        expected_std = ((1.0 if j == 0 else expected_std ** 2) +
                        alpha ** 2) ** 0.5
        in_ch, index = width, index + 1
    final_width = final_conv_width(widths[-1], final_conv_mult, final_conv_ch)
    self.final_conv = conv(final_width, 1, name="final_conv")
    self.classifier = common.classifier(num_classes, fc_init_std)
    self.feature_info = common.feature_info(
        widths[0] // 2, STEM_STRIDE, widths, layout, final_width)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network.

    Args:
      images: [N, H, W, 3], H and W at least 32 (the total stride).
      is_training: enables stochastic depth and dropout (needs an rng).
      return_metrics: also return the per-block signal metrics.
      return_features: also return the features of `feature_info`.

    Returns:
      logits [N, num_classes] (headless: the pre-logits [N, C]); then, as
      asked, a dict of per-block arrays `avg_sq_mean`, `avg_var` (block
      outputs), `res_var` (residual branch ends) and `stage`, and a dict of
      features {name: array} (`common.outputs`).
    """
    common.check_image(images, self.output_stride)
    out = images
    for i, conv in enumerate(self.stem):
      out = conv(out)
      if i < len(self.stem) - 1:
        out = self.activation(out)
    return common.blocks_and_head(self, out, is_training, return_metrics,
                                  return_features)
