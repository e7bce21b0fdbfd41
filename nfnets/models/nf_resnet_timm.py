"""timm's NF-ResNets: `nf_seresnet26/50/101`, `nf_ecaresnet26/...` and the
plain ones, registered as `nf_resnet26_timm/50/101` (`attention=None`) since
`nf_resnet50` is DeepMind's (`nf_resnet.py`), another function.

timm's pre-activation NF-ResNets (`timm/models/nfnet.py`, `_nfres_cfg` with
`attn_layer='se'` (hidden width 1/16) or `'eca'`), after Brock, De, Smith,
ICLR 2021. They share `nfnet_light.NormFreeBlock` with timm's light NFNets
and differ from DeepMind's NF-ResNet (`nf_resnet.py`) as those do from the
F-series: gamma folded into the convs, WS eps 1e-5 added to the variance,
symmetric padding, the last conv's gain zero at init instead of a
`skip_gain`, an average-pooled shortcut conv at transitions (not a strided
one), stochastic depth rescaling kept branches; plus the attention applied
as `2 * gate * x` after the last conv. The stem is a 7x7 stride-2 conv and
a 3x3 stride-2 max pool padded by 1, with no activation between.

The parameter tree is timm's state dict under `NFResNetTimm/~/`, mapped
key for key by `nfnet_light.haiku_name` and `haiku_array`:
`stem.conv.weight` [64, 3, 7, 7] is `NFResNetTimm/~/stem/~/conv` `w`
[7, 7, 3, 64]; `stages.0.1.attn_last.fc2.weight` [256, 16, 1, 1] is
`NFResNetTimm/~/stages_0_1/~/attn_last/~/fc2` `w` [1, 1, 16, 256].
"""

from typing import Optional, Union

import haiku as hk
import jax
import numpy as np

from nfnets import layers
from nfnets.models import common
from nfnets.models import nfnet_light
from nfnets.models.nf_resnet import DEPTHS as _ALL_DEPTHS

DEPTHS = {d: _ALL_DEPTHS[d] for d in (26, 50, 101)}  # those timm registers
ATTENTIONS = ("se", "eca")
WIDTHS = (256, 512, 1024, 2048)
STEM_WIDTH = 64
BOTTLE_RATIO = 0.25
SE_RATIO = 1 / 16
STEM_STRIDE = 4
TOTAL_STRIDE = 32  # 7x7 conv and max pool, then three strided stages


class PoolStem(hk.Module):
  """timm's '7x7_pool' stem: a 7x7 stride-2 conv (`conv`), then max pool."""

  def __init__(self, width: int, conv, name: str = "stem"):
    super().__init__(name=name)
    self.conv = conv(width, 7, stride=2, name="conv")

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    # PyTorch's MaxPool2d(3, 2, padding=1): symmetric, not SAME. The init
    # value is a concrete numpy scalar: a traced one (jnp.array under jit)
    # hides that this is a max pool, which JAX can then not differentiate.
    return jax.lax.reduce_window(
        x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 3, 3, 1),
        (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class NFResNetTimm(hk.Module):
  """timm's NF-ResNet classifier, SE, ECA or plain (NHWC input).

  `attention` is 'se', 'eca' or None; `width_multiplier` (timm's
  `width_factor`, widths rounded to multiples of 8), `activation`,
  `standardize=False`, `remat` and the backbone options (`num_classes=0`,
  `output_stride`, `return_features`) as for `nfnet_light.NFNetLight`; no
  final conv. timm's defaults: no stochastic depth or dropout.
  """

  def __init__(self, num_classes: int = 1000, depth: int = 50, *,
               attention: Optional[str] = "se",
               width_multiplier: float = 1.0,
               activation: Union[str, layers.Activation] = "relu",
               alpha: float = 0.2, drop_path_rate: float = 0.0,
               dropout_rate: float = 0.0, fc_init_std: float = 0.01,
               standardize: bool = True, remat: bool = False,
               output_stride: int = TOTAL_STRIDE,
               name: str = "NFResNetTimm"):
    super().__init__(name=name)
    if depth not in DEPTHS:
      raise ValueError(f"unknown timm NF-ResNet depth {depth}; valid: "
                       f"{', '.join(map(str, DEPTHS))}")
    if attention is not None and attention not in ATTENTIONS:
      raise ValueError(f"unknown attention {attention!r}; valid: "
                       f"{', '.join(ATTENTIONS)}")
    if width_multiplier <= 0:
      raise ValueError(
          f"width_multiplier must be positive, got {width_multiplier}")
    if not 0 <= drop_path_rate < 1 or not 0 <= dropout_rate < 1:
      raise ValueError(f"bad drop_path_rate {drop_path_rate} or dropout_rate "
                       f"{dropout_rate}")
    self.remat = remat
    layout = common.stage_layout(nfnet_light.STRIDES, STEM_STRIDE,
                                 output_stride)
    self.output_stride = output_stride
    self.dropout_rate = dropout_rate
    self.activation, gamma = nfnet_light.activation_and_gamma(activation)
    conv = lambda ch, k, **kw: layers.ScaledStdConv2D(  # pylint: disable=g-long-lambda
        ch, k, gamma=gamma, standardize=standardize, **kw)
    stem_width = nfnet_light.make_divisible(STEM_WIDTH * width_multiplier)
    self.stem = PoolStem(stem_width, conv)
    widths = [nfnet_light.make_divisible(w * width_multiplier)
              for w in WIDTHS]
    self.blocks, self.block_stages = nfnet_light.make_blocks(
        stem_width, widths, DEPTHS[depth], drop_path_rate=drop_path_rate,
        alpha=alpha, layout=layout, group_width=None, bottle_ratio=BOTTLE_RATIO,
        extra_conv=False, attention=attention, se_ratio=SE_RATIO,
        activation=self.activation, gamma=gamma, standardize=standardize)
    self.classifier = common.classifier(num_classes, fc_init_std)
    self.feature_info = common.feature_info(stem_width, STEM_STRIDE, widths,
                                            layout)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network; see `NFNet.__call__` for the arguments."""
    common.check_image(images, self.output_stride)
    return common.blocks_and_head(self, self.stem(images), is_training,
                                  return_metrics, return_features)
