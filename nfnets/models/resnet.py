"""Batch-normalised pre-activation ResNet (v2): the NF-ResNet baseline.

He, Zhang, Ren, Sun. "Identity Mappings in Deep Residual Networks." ECCV 2016.
Same depths and widths as `nf_resnet`; it keeps BatchNorm statistics as Haiku
state, which the NF models do not need.
"""

from typing import Optional

import haiku as hk
import jax

from nfnets import layers
from nfnets.models import nf_resnet
from nfnets.models import common


def _batch_norm(name: str, scale_init=None) -> hk.BatchNorm:
  return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9,
                      scale_init=scale_init, name=name)


def _conv(channels: int, kernel: int, stride: int = 1,
          name: Optional[str] = None) -> hk.Conv2D:
  return hk.Conv2D(channels, kernel, stride=stride, with_bias=False,
                   padding="SAME", name=name,
                   w_init=hk.initializers.VarianceScaling(2.0, "fan_in",
                                                          "normal"))


class ResBlockV2(hk.Module):
  """Pre-activation bottleneck: `h + f(relu(bn(h)))`, BN before each conv.

  Dilations as `nf_resnet.NFResBlock`'s.
  """

  def __init__(self, in_channels: int, out_channels: int, *, stride: int,
               drop_rate: float, scale_by_keep: bool = False,
               first_dilation: int = 1, dilation: int = 1,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.first_dilation = first_dilation
    width = out_channels // 4
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep
    self.bn0 = _batch_norm("bn0")
    self.conv0 = _conv(width, 1, name="conv0")
    self.bn1 = _batch_norm("bn1")
    self.conv1 = _conv(width, 3, stride, name="conv1")
    self.bn2 = _batch_norm("bn2")
    self.conv2 = _conv(out_channels, 1, name="conv2")
    self.conv_shortcut = None
    if stride > 1 or dilation != first_dilation or in_channels != out_channels:
      self.conv_shortcut = _conv(out_channels, 1, stride, name="conv_shortcut")

  def __call__(self, x: jax.Array,
               is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = jax.nn.relu(self.bn0(x, is_training))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.conv0(out)
    out = common.dilated(self.conv1, jax.nn.relu(self.bn1(out, is_training)),
                         self.first_dilation)
    out = self.conv2(jax.nn.relu(self.bn2(out, is_training)))
    _, res_var = layers.signal_metrics(out)
    out = layers.stochastic_depth(out, self.drop_rate, is_training,
                                  scale_by_keep=self.scale_by_keep)
    return out + shortcut, res_var


class ResNet(hk.Module):
  """BN pre-activation ResNet-26 to -600 classifier (NHWC input).

  Stochastic depth (off by default) does not rescale kept branches unless
  `drop_path_scale_by_keep`, as for the NF models; so are the backbone
  options (`num_classes=0`, `output_stride`, `return_features`). Frozen
  stages (`optimizer.freeze_stages`) keep updating their BN statistics.
  """

  def __init__(self, num_classes: int = 1000, depth: int = 50, *,
               width_multiplier: float = 1.0, drop_path_rate: float = 0.0,
               drop_path_scale_by_keep: bool = False,
               dropout_rate: float = 0.0,
               output_stride: int = nf_resnet.TOTAL_STRIDE,
               name: str = "ResNet"):
    super().__init__(name=name)
    depths = nf_resnet.check_depth(depth)
    layout = common.stage_layout(nf_resnet.STRIDES, nf_resnet.STEM_STRIDE,
                                 output_stride)
    self.output_stride = output_stride
    widths = [int(w * width_multiplier) for w in nf_resnet.WIDTHS]
    if min(widths) < 4:
      raise ValueError(f"width_multiplier {width_multiplier} leaves a stage "
                       "with fewer than 4 channels")
    self.dropout_rate = dropout_rate
    self.stem = _conv(widths[0] // 4, 7, 2, name="initial_conv")
    self.blocks, self.block_stages = [], []
    in_ch, index, total = widths[0] // 4, 0, sum(depths)
    for stage, (width, count) in enumerate(zip(widths, depths)):
      for j in range(count):
        self.blocks.append(ResBlockV2(
            in_ch, width, **layout[stage].block(j),
            drop_rate=drop_path_rate * index / total,
            scale_by_keep=drop_path_scale_by_keep))
        self.block_stages.append(stage)
        in_ch, index = width, index + 1
    self.final_bn = _batch_norm("final_bn")
    self.classifier = common.classifier(num_classes, 0.0)
    self.feature_info = common.feature_info(widths[0] // 4,
                                            nf_resnet.STEM_STRIDE, widths,
                                            layout)

  def __call__(self, images: jax.Array, is_training: bool,
               return_metrics: bool = False, return_features: bool = False):
    """Applies the network; see `NFNet.__call__` for the arguments."""
    common.check_image(images, self.output_stride)
    out = hk.max_pool(self.stem(images), (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    collected = {"stem": out}
    out, metrics = common.apply_blocks(self.blocks, self.block_stages, out,
                                       is_training, collected=collected)
    out = jax.nn.relu(self.final_bn(out, is_training))
    output = common.classify(out, self.classifier, self.dropout_rate,
                             is_training, collected)
    return common.outputs(output, metrics, collected, return_metrics,
                          return_features)
