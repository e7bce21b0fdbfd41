"""timm's light NFNets: `nfnet_l0` and `eca_nfnet_l0` to `eca_nfnet_l3`.

Ross Wightman's slimmed NFNet-F variants in timm (`timm/models/nfnet.py`,
`_nfnet_cfg`, timm 1.0), built on the NFNet of Brock, De, Smith, Simonyan,
ICML 2021. Against DeepMind's F-series (`nfnet.py`), block for block:

- SiLU, and its gamma folded into every conv (`layers.ScaledStdConv2D`,
  timm's `gamma_in_act=False`) instead of scaling the activations; WS adds
  eps 1e-5 to the variance; convs and the max pool pad symmetrically.
- Bottlenecks 1/4 of the block's width in groups of 64 channels, ECA
  (`eca_nfnet_*`) or squeeze-excite with ratio 0.25 (`nfnet_l0`) after the
  last conv, applied as `2 * gate * x`.
- Widths rounded to multiples of 8 (`make_divisible`); final conv 1.5x the
  last stage (L0) or 2x (L1-L3).
- No scalar `skip_gain`: the branch's last conv has its gain initialised to
  zero instead (timm's `skipinit=False`), so each block starts as its
  shortcut all the same.
- A shortcut conv after 2x2 average pooling (ceil mode, padding excluded)
  wherever the shape changes; stochastic depth from 0 at the first block to
  `drop_path_rate` at the last, kept branches divided by the keep
  probability (timm's `DropPath`).

Parameter tree: timm's state dict, tensor for tensor (`haiku_name`,
`haiku_array`). A key `<module>.<param>` becomes the Haiku module
`<root>/~/<module>` with each `.` before a number written `_` and every
other `.` written `/~/`, and `head.fc` written `linear` (the classifier the
AGC mask leaves out); `weight` becomes `w`, `bias` `b`, `gain` `gain`:

  timm (eca_nfnet_l0)                   ours, under NFNetLight/~/
  stem.conv1.weight [16, 3, 3, 3]       stem/~/conv1 w [3, 3, 3, 16]
  stem.conv1.gain [16, 1, 1, 1]         stem/~/conv1 gain [16]
  stages.0.0.downsample.conv.bias       stages_0_0/~/downsample/~/conv b
  stages.1.0.conv2.weight [128, 64, 3, 3]
                                        stages_1_0/~/conv2 w [3, 3, 64, 128]
  stages.1.0.attn_last.conv.weight [1, 1, 5]
                                        stages_1_0/~/attn_last/~/conv
                                        w [5, 1, 1]
  stages.0.0.attn_last.fc1.weight [64, 256, 1, 1] (nfnet_l0's SE)
                                        stages_0_0/~/attn_last/~/fc1
                                        w [1, 1, 256, 64]
  final_conv.weight [2304, 1536, 1, 1]  final_conv w [1, 1, 1536, 2304]
  head.fc.weight [1000, 2304]           linear w [2304, 1000]

Conv kernels go OIHW to HWIO, ECA's OIW to WIO, the classifier's [out, in]
to [in, out], gains [O, 1, 1, 1] to [O]; biases are unchanged.
`nf_resnet_timm.py` builds timm's SE/ECA NF-ResNets from the same block.
"""

import dataclasses
import re
from typing import Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import layers
from nfnets.models import common


@dataclasses.dataclass(frozen=True)
class Variant:
  """One light NFNet: timm's `model_cfgs` entry (its resolutions are in
  `nfnets.weight_preprocessing`, with the rest of timm's `pretrained_cfg`)."""
  depths: tuple[int, ...]
  final_conv_mult: float
  attention: str  # 'eca' or 'se'


VARIANTS: dict[str, Variant] = {
    "nfnet_l0": Variant((1, 2, 6, 3), 1.5, "se"),
    "eca_nfnet_l0": Variant((1, 2, 6, 3), 1.5, "eca"),
    "eca_nfnet_l1": Variant((2, 4, 12, 6), 2.0, "eca"),
    "eca_nfnet_l2": Variant((3, 6, 18, 9), 2.0, "eca"),
    "eca_nfnet_l3": Variant((4, 8, 24, 12), 2.0, "eca"),
}
WIDTHS = (256, 512, 1536, 1536)
STRIDES = (1, 2, 2, 2)
STEM_WIDTH = 128
GROUP_WIDTH = 64
BOTTLE_RATIO = 0.25
SE_RATIO = 0.25  # nfnet_l0's SE: hidden width a quarter of the block's
ATTENTION_GAIN = 2.0
STEM_STRIDE = 4
TOTAL_STRIDE = 32  # stem 4 x three strided stages
_TIMM_NAMES = {"weight": "w", "bias": "b", "gain": "gain"}
# By rank: conv OIHW -> HWIO, ECA conv OIW -> WIO, dense [out, in] -> [in,
# out], bias.
_TIMM_LAYOUTS = {4: (2, 3, 1, 0), 3: (2, 1, 0), 2: (1, 0), 1: (0,)}


def make_divisible(value: float, divisor: int = 8,
                   round_limit: float = 0.9) -> int:
  """timm's channel rounding: the nearest multiple of `divisor`, at least
  `divisor`, and not below `round_limit` of `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < round_limit * value:
    rounded += divisor
  return rounded


def haiku_name(key: str, root: str) -> tuple[str, str]:
  """timm's state-dict key -> (Haiku module path, parameter name).

  e.g. ('stages.1.0.conv2.weight', 'NFNetLight') ->
  ('NFNetLight/~/stages_1_0/~/conv2', 'w'); see the module docstring.
  """
  module, param = key.rsplit(".", 1)
  if module == "head.fc":
    module = "linear"
  module = re.sub(r"\.(\d+)", r"_\1", module).replace(".", "/~/")
  return f"{root}/~/{module}", _TIMM_NAMES[param]


def haiku_array(key: str, value: np.ndarray) -> np.ndarray:
  """timm's tensor (as numpy) for `key` -> our array of the same numbers."""
  if key.endswith(".gain"):
    return value.reshape(-1)
  return np.transpose(value, _TIMM_LAYOUTS[value.ndim])


def activation_and_gamma(activation: Union[str, layers.Activation]):
  """(f, gamma) for a name in `layers.ACTIVATIONS` or a callable."""
  if callable(activation):
    return activation, layers.activation_gamma(activation)
  if activation not in layers.ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; valid: "
                     f"{', '.join(sorted(layers.ACTIVATIONS))}")
  return layers.ACTIVATIONS[activation], layers.GAMMAS[activation]


class DownsampleAvg(hk.Module):
  """timm's shortcut: 2x2 average pool (when strided), then a 1x1 conv."""

  def __init__(self, out_channels: int, stride: int, conv,
               name: str = "downsample"):
    super().__init__(name=name)
    self.stride = stride
    self.conv = conv(out_channels, 1, name="conv")

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.stride > 1:
      # SAME averages only the pixels inside, as timm's ceil_mode pool with
      # count_include_pad=False.
      x = hk.avg_pool(x, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
    return self.conv(x)


class NormFreeBlock(hk.Module):
  """timm's `NormFreeBlock` (ResNet style): `h + alpha * f(act(h) * beta)`.

  The branch: 1x1 conv (`conv1`), 3x3 grouped conv carrying the stride
  (`conv2`), with `extra_conv` a second one (`conv2b`), 1x1 conv with its
  gain initialised to 0 (`conv3`), then `2 * gate * x` of the attention
  (`attn_last`: 'eca', 'se' or None) and stochastic depth. Dilated
  (`common.stage_layout`), `conv2` takes `first_dilation` and `conv2b`
  `dilation`; a dilated stage's first block keeps its shortcut conv,
  without the pool (timm pools 2x2 at stride 1 there).
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               beta: float, alpha: float, group_width: Optional[int],
               bottle_ratio: float, extra_conv: bool, attention: Optional[str],
               se_ratio: float, activation: layers.Activation, gamma: float,
               drop_rate: float, standardize: bool = True,
               first_dilation: int = 1, dilation: int = 1,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.beta, self.alpha, self.drop_rate = beta, alpha, drop_rate
    self.first_dilation, self.dilation = first_dilation, dilation
    self.activation = activation
    mid = make_divisible(out_channels * bottle_ratio)
    groups = mid // group_width if group_width else 1
    if groups < 1:
      raise ValueError(f"a block of {out_channels} channels has a "
                       f"bottleneck of {mid}, narrower than the group width "
                       f"{group_width}; lower the group width")
    if group_width and group_width % 8 == 0:
      mid = group_width * groups  # timm's correction to whole groups
    conv = lambda ch, k, **kw: layers.ScaledStdConv2D(  # pylint: disable=g-long-lambda
        ch, k, gamma=gamma, standardize=standardize, **kw)
    self.downsample = None
    if in_channels != out_channels or stride != 1 or dilation != first_dilation:
      self.downsample = DownsampleAvg(out_channels, stride, conv)
    self.conv1 = conv(mid, 1, name="conv1")
    self.conv2 = conv(mid, 3, stride=stride, feature_group_count=groups,
                      name="conv2")
    self.conv2b = None
    if extra_conv:
      self.conv2b = conv(mid, 3, feature_group_count=groups, name="conv2b")
    self.conv3 = conv(out_channels, 1, gain_init=0.0, name="conv3")
    self.attn = None
    if attention == "eca":
      self.attn = layers.EfficientChannelAttention(out_channels,
                                                   name="attn_last")
    elif attention == "se":
      hidden = make_divisible(out_channels * se_ratio, round_limit=0.0)
      self.attn = layers.ConvSqueezeExcite(out_channels, hidden,
                                           name="attn_last")
    elif attention is not None:
      raise ValueError(f"unknown attention {attention!r}; valid: eca, se")

  def __call__(self, x: jax.Array,
               is_training: bool) -> tuple[jax.Array, jax.Array]:
    """Returns the block output and the residual branch's average variance."""
    out = self.activation(x) * self.beta
    shortcut = x if self.downsample is None else self.downsample(out)
    out = self.conv1(out)
    out = common.dilated(self.conv2, self.activation(out),
                         self.first_dilation)
    if self.conv2b is not None:
      out = common.dilated(self.conv2b, self.activation(out), self.dilation)
    out = self.conv3(self.activation(out))
    scale = self.alpha
    if self.attn is not None:
      gate = ATTENTION_GAIN * self.attn(out).astype(jnp.float32)
      scale = scale * gate
      _, res_var = layers.signal_metrics(gate * out)
    else:
      _, res_var = layers.signal_metrics(out)
    out = layers.stochastic_depth(out, self.drop_rate, is_training, scale,
                                  scale_by_keep=True)
    return out + shortcut, res_var


def make_blocks(in_channels: int, widths: Sequence[int],
                depths: Sequence[int], *, drop_path_rate: float, alpha: float,
                layout: Sequence[common.StageLayout],
                **block_options) -> tuple[list[NormFreeBlock], list[int]]:
  """timm's stages: blocks `stages_{stage}_{index}` and their stage indices.

  `beta` is 1 / the expected std of each block's input: the variance grows
  by alpha^2 a block and restarts at 1 after each stage's first block,
  whose shortcut is a conv of the normalised input (ICML 2021, Sec. 3).
  Stochastic-depth rates rise linearly from 0 to `drop_path_rate` over all
  blocks (timm's `calculate_drop_path_rates`). `layout` gives each stage's
  strides and dilations (`common.stage_layout`).
  """
  total = sum(depths)
  rates = np.linspace(0.0, drop_path_rate, total)
  blocks, stages, index, expected_var = [], [], 0, 1.0
  for stage, (width, depth) in enumerate(zip(widths, depths)):
    for j in range(depth):
      blocks.append(NormFreeBlock(
          in_channels, width, **layout[stage].block(j),
          beta=expected_var ** -0.5, alpha=alpha,
          drop_rate=float(rates[index]), name=f"stages_{stage}_{j}",
          **block_options))
      stages.append(stage)
      expected_var = (1.0 if j == 0 else expected_var) + alpha ** 2
      in_channels, index = width, index + 1
  return blocks, stages


class DeepStem(hk.Module):
  """timm's 'deep_quad' stem: four 3x3 convs, strides 2, 1, 1, 2, widths
  1/8, 1/4, 1/2 and all of `width`, the activation between them."""

  def __init__(self, width: int, conv, activation: layers.Activation,
               name: str = "stem"):
    super().__init__(name=name)
    self.activation = activation
    self.convs = [conv(width // d, 3, stride=s, name=f"conv{i + 1}")
                  for i, (d, s) in enumerate(zip((8, 4, 2, 1), (2, 1, 1, 2)))]

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, conv in enumerate(self.convs):
      x = conv(x if i == 0 else self.activation(x))
    return x


class NFNetLight(hk.Module):
  """timm's light NFNet classifier (NHWC input); see the module docstring.

  `variant` is the registered name (`eca_nfnet_l0`, ...). For research and
  tests: `width_multiplier` (timm's `width_factor`, stem included, rounded
  to multiples of 8), `group_width` (timm's `group_size`), `depths`,
  `final_conv_mult`, `activation` (its gamma goes into the convs),
  `standardize=False` (plain convs, the signal-propagation control) and
  `remat` and the backbone options (`num_classes=0`, `output_stride`,
  `return_features`) as for `NFNet`. timm's defaults: no stochastic depth
  or dropout.
  """

  def __init__(self, num_classes: int = 1000, variant: str = "eca_nfnet_l0",
               *, width_multiplier: float = 1.0,
               group_width: int = GROUP_WIDTH,
               depths: Optional[Sequence[int]] = None,
               final_conv_mult: Optional[float] = None,
               activation: Union[str, layers.Activation] = "silu",
               alpha: float = 0.2, drop_path_rate: float = 0.0,
               dropout_rate: float = 0.0, fc_init_std: float = 0.01,
               standardize: bool = True, remat: bool = False,
               output_stride: int = TOTAL_STRIDE, name: str = "NFNetLight"):
    super().__init__(name=name)
    if variant not in VARIANTS:
      raise ValueError(f"unknown light NFNet {variant!r}; valid: "
                       f"{', '.join(VARIANTS)}")
    row = VARIANTS[variant]
    depths = tuple(depths) if depths is not None else row.depths
    if len(depths) != len(STRIDES) or min(depths) < 1:
      raise ValueError(f"depths must be 4 positive block counts, got {depths}")
    if width_multiplier <= 0 or group_width < 1:
      raise ValueError("width_multiplier and group_width must be positive, "
                       f"got {width_multiplier} and {group_width}")
    if not 0 <= drop_path_rate < 1 or not 0 <= dropout_rate < 1:
      raise ValueError(f"bad drop_path_rate {drop_path_rate} or dropout_rate "
                       f"{dropout_rate}")
    self.remat = remat
    layout = common.stage_layout(STRIDES, STEM_STRIDE, output_stride)
    self.output_stride = output_stride
    self.dropout_rate = dropout_rate
    self.activation, gamma = activation_and_gamma(activation)
    conv = lambda ch, k, **kw: layers.ScaledStdConv2D(  # pylint: disable=g-long-lambda
        ch, k, gamma=gamma, standardize=standardize, **kw)
    stem_width = make_divisible(STEM_WIDTH * width_multiplier)
    self.stem = DeepStem(stem_width, conv, self.activation)
    widths = [make_divisible(w * width_multiplier) for w in WIDTHS]
    self.blocks, self.block_stages = make_blocks(
        stem_width, widths, depths, drop_path_rate=drop_path_rate,
        alpha=alpha, layout=layout, group_width=group_width,
        bottle_ratio=BOTTLE_RATIO, extra_conv=True, attention=row.attention, se_ratio=SE_RATIO,
        activation=self.activation, gamma=gamma, standardize=standardize)
    mult = row.final_conv_mult if final_conv_mult is None else final_conv_mult
    if mult <= 0:
      raise ValueError(f"final_conv_mult must be positive, got {mult}")
    # timm rounds the width times the multiplier, not the widened stage.
    final_width = make_divisible(
        width_multiplier * int(WIDTHS[-1] * mult))
    self.final_conv = conv(final_width, 1, name="final_conv")
    self.classifier = common.classifier(num_classes, fc_init_std)
    self.feature_info = common.feature_info(stem_width, STEM_STRIDE, widths,
                                            layout, final_width)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network; see `NFNet.__call__` for the arguments."""
    common.check_image(images, self.output_stride)
    return common.blocks_and_head(self, self.stem(images), is_training,
                                  return_metrics, return_features)
