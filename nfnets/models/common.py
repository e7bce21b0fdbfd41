"""What the model files share: input checks, the block loop, the head, and
the backbone interface.

Every network here is a stem, residual blocks that return their output and
their residual branch's variance, and a pooled classifier; `apply_blocks`
runs the blocks and collects the signal-propagation metrics of each.

As backbones (timm's `feature_info` / `features_only`, DeepLab's atrous
ResNets), every model:

- names its features: `stem` (the first block's input), `stage0` ...
  `stage3` (each stage's last block output: the residual stream, before the
  next block's activation), `final_conv` (activated; NFNets, light NFNets,
  NF-RegNets) and `pre_logits` (the head's input, pooled, before dropout),
  listed with channels and stride by `feature_info` without running
  anything, returned by `__call__(..., return_features=True)` (`outputs`);
- with `num_classes=0` has no classifier and returns `pre_logits`;
- with `output_stride` 16 or 8 runs the last strided stages at stride 1
  with dilated 3x3 convs (`stage_layout`, `dilated`): the same parameters;
- names its parts `stem`, `blocks` (with `block_stages`), `final_conv` or
  `final_bn`, and `classifier`, so `parameter_groups` maps each parameter
  to its group (`stem`, `stage<i>`, `final`, `head`) for freezing.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers

STEM, FINAL, HEAD = "stem", "final", "head"


def check_image(images: jax.Array, total_stride: int) -> None:
  """Raises a clear ValueError for images a network cannot take."""
  if images.ndim != 4:
    raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
  if min(images.shape[1:3]) < total_stride:
    raise ValueError(
        f"image {images.shape[1]}x{images.shape[2]} is smaller than the "
        f"network's total stride {total_stride}; use at least "
        f"{total_stride}x{total_stride}")


def pooled_shortcut_start(x: jax.Array, *, activation, beta: float,
                          stride: int, conv_shortcut
                          ) -> tuple[jax.Array, jax.Array]:
  """How the NFNet and NF-RegNet blocks start (the released `NFBlock`).

  The branch input is `activation(x) * beta`. The shortcut is `x`, or, when
  the block changes resolution or width, a 2x2 average pool (at stride 2)
  of the branch input and then `conv_shortcut`.

  Returns:
    (branch input, shortcut).
  """
  out = activation(x) * beta
  shortcut = x
  if stride > 1:
    shortcut = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
  elif conv_shortcut is not None:
    shortcut = out
  if conv_shortcut is not None:
    shortcut = conv_shortcut(shortcut)
  return out, shortcut


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


def classifier(num_classes: int, init_std: float) -> Optional[hk.Linear]:
  """The head `linear`: weights N(0, init_std^2), or zeros for 0; bias 0.

  The released NFNet and NF-ResNet code initialise it with N(0, 0.01^2);
  zeros (`init_std=0`) suit fine-tuning a new head. None (no parameters)
  for `num_classes=0`: a headless model.
  """
  if num_classes < 0:
    raise ValueError(f"num_classes must be positive, got {num_classes} (or "
                     "0 for a headless model)")
  if num_classes == 0:
    return None
  if init_std < 0:
    raise ValueError(f"fc_init_std must be >= 0, got {init_std}")
  w_init = (hk.initializers.RandomNormal(init_std) if init_std > 0
            else jnp.zeros)
  return hk.Linear(num_classes, w_init=w_init, name="linear")


def classify(features: jax.Array, classifier: Optional[Callable],
             dropout_rate: float, is_training: bool,
             collected: Optional[dict[str, jax.Array]] = None) -> jax.Array:
  """Global average pool, dropout when training, then the classifier.

  With no classifier (a headless model) the pooled features, undropped;
  `collected` receives them as `pre_logits`.
  """
  pooled = jnp.mean(features, axis=(1, 2))
  if collected is not None:
    collected["pre_logits"] = pooled
  if classifier is None:
    return pooled
  if is_training and dropout_rate > 0:
    pooled = hk.dropout(hk.next_rng_key(), dropout_rate, pooled)
  return classifier(pooled)


def blocks_and_head(net, stem: jax.Array, is_training: bool,
                    return_metrics: bool, return_features: bool):
  """The rest of an NF network's forward pass, from its stem's output.

  `net.blocks` (with `block_stages`, `remat`), then `net.final_conv` where
  the network has one (activated, collected as `final_conv`), else just the
  activation, then the pooled head (`classify`) and the outputs asked for
  (`outputs`); `net` also has `activation`, `classifier`, `dropout_rate`.
  """
  collected = {"stem": stem}
  out, metrics = apply_blocks(net.blocks, net.block_stages, stem,
                              is_training, net.remat, collected)
  if getattr(net, "final_conv", None) is not None:
    out = collected["final_conv"] = net.activation(net.final_conv(out))
  else:
    out = net.activation(out)
  output = classify(out, net.classifier, net.dropout_rate, is_training,
                    collected)
  return outputs(output, metrics, collected, return_metrics, return_features)


def apply_blocks(blocks, stages, x: jax.Array, is_training: bool,
                 remat: bool = False,
                 collected: Optional[dict[str, jax.Array]] = None):
  """Runs residual blocks, collecting the per-block signal metrics.

  Args:
    blocks: modules returning (output, residual-branch average variance).
    stages: the stage index of each block.
    x: the input to the first block.
    is_training: passed to each block.
    remat: recompute each block's activations in the backward pass
      (`hk.remat`) instead of storing them: only block inputs stay in
      memory, for about one more forward pass of compute.
    collected: receives each stage's last output as `stage<i>`.

  Returns:
    The last block's output and a dict of per-block arrays: `avg_sq_mean` and
    `avg_var` of each block's output, `res_var` of its residual branch's end
    (before stochastic depth and skip_gain), and `stage`.
  """
  sq_means, variances, res_vars = [], [], []
  for i, block in enumerate(blocks):
    call = functools.partial(block, is_training=is_training)
    x, res_var = (hk.remat(call) if remat else call)(x)
    if collected is not None and (i + 1 == len(blocks) or
                                  stages[i + 1] != stages[i]):
      collected[f"stage{stages[i]}"] = x
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


def outputs(output: jax.Array, metrics: dict[str, jax.Array],
            collected: dict[str, jax.Array], return_metrics: bool,
            return_features: bool):
  """What `__call__` returns: `output`, or a tuple of it and, in this order,
  the metrics and the features asked for."""
  extra = ((metrics,) if return_metrics else ()) + (
      (collected,) if return_features else ())
  return (output, *extra) if extra else output


@dataclasses.dataclass(frozen=True)
class StageLayout:
  """How one stage runs: its first block's stride, its dilations, and the
  stride of its output relative to the image."""
  stride: int
  first_dilation: int  # of the first block's strided 3x3 conv
  dilation: int  # of the stage's other 3x3 convs
  net_stride: int

  def block(self, j: int) -> dict[str, int]:
    """`stride`, `first_dilation` and `dilation` of the stage's block j."""
    if j == 0:
      return dict(stride=self.stride, first_dilation=self.first_dilation,
                  dilation=self.dilation)
    return dict(stride=1, first_dilation=self.dilation,
                dilation=self.dilation)


def stage_layout(strides: Sequence[int], stem_stride: int,
                 output_stride: int) -> list[StageLayout]:
  """Each stage's stride and dilations for a given output stride.

  Once the network's stride reaches `output_stride`, each later strided
  stage runs at stride 1 and multiplies the dilation by its stride, as in
  DeepLab (Chen et al., TPAMI 2017, Sec. 3.1) and timm: the first block's
  strided conv keeps the dilation before the stage (it sees the same
  pixels as before), the convs after it take the new one. The stem's
  stride cannot be dilated away.

  Args:
    strides: each stage's stride.
    stem_stride: the stride of the stem's output.
    output_stride: the stride wanted at the last stage.

  Returns:
    One `StageLayout` per stage.

  Raises:
    ValueError: for an output stride the network cannot give, naming those
      it can.
  """
  valid = sorted({stem_stride * math.prod(strides[:i + 1])
                  for i in range(len(strides))})
  if output_stride not in valid:
    raise ValueError(
        f"output_stride must be one of {', '.join(map(str, valid))} (the "
        f"stride after each stage; the stem's {stem_stride} cannot be "
        f"dilated), got {output_stride}")
  layout, net, dilation = [], stem_stride, 1
  for stride in strides:
    first = dilation
    if net >= output_stride and stride > 1:
      dilation, stride = dilation * stride, 1
    net *= stride
    layout.append(StageLayout(stride, first, dilation, net))
  return layout


def dilated(conv: Callable[[jax.Array], jax.Array], x: jax.Array,
            rate: int) -> jax.Array:
  """`conv` (stride 1, odd kernel, output the input's size) with its kernel
  dilated by `rate`.

  Space-to-batch (TF's `atrous_conv2d`; Chen et al., DeepLab): the `rate**2`
  phases of the input (pixels `(rate*u + p, rate*v + q)`) go into the batch,
  `conv` runs on them as it is, and the outputs are interleaved back. This
  is exactly the dilated convolution with SAME (for odd kernels, symmetric)
  zero padding: a phase's out-of-range neighbours are the padding's zeros.
  Any conv module works unchanged (its parameters, its fast paths), at the
  cost of two transposes.

  Args:
    conv: a stride-1 convolution, e.g. a `layers.WSConv2D`.
    x: its input [N, H, W, C].
    rate: the dilation; 1 calls `conv` directly.

  Returns:
    [N, H, W, C_out].
  """
  if rate == 1:
    return conv(x)
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (0, -h % rate), (0, -w % rate), (0, 0)))
  hp, wp = x.shape[1] // rate, x.shape[2] // rate
  x = x.reshape(n, hp, rate, wp, rate, c).transpose(2, 4, 0, 1, 3, 5)
  y = conv(x.reshape(rate * rate * n, hp, wp, c))
  y = y.reshape(rate, rate, n, hp, wp, y.shape[-1]).transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(n, hp * rate, wp * rate, -1)[:, :h, :w]


def feature_info(stem_channels: int, stem_stride: int,
                 stage_channels: Sequence[int], layout: Sequence[StageLayout],
                 final_channels: Optional[int] = None) -> list[dict[str, Any]]:
  """The features a model returns, in order: {name, channels, stride}.

  `pre_logits` is pooled (shape [N, channels]): its stride is None.
  """
  info = [dict(name="stem", channels=stem_channels, stride=stem_stride)]
  info += [dict(name=f"stage{i}", channels=c, stride=row.net_stride)
           for i, (c, row) in enumerate(zip(stage_channels, layout))]
  last = stage_channels[-1]
  if final_channels is not None:
    info.append(dict(name="final_conv", channels=final_channels,
                     stride=layout[-1].net_stride))
    last = final_channels
  return info + [dict(name="pre_logits", channels=last, stride=None)]


def module_groups(model: hk.Module) -> dict[str, str]:
  """{module path: parameter group} from the model's part names.

  `stem` (a module or a list) is group `stem`, each of `blocks` is
  `stage<block_stages[i]>`, `final_conv` / `final_bn` are `final` and
  `classifier` is `head`; the submodules of each go with it. Parameters of
  the root module itself go by `model.root_parameter_groups` (Fixup's
  scalar biases).
  """
  stem = model.stem if isinstance(model.stem, (list, tuple)) else [model.stem]
  groups = {m.module_name: STEM for m in stem}
  for block, stage in zip(model.blocks, model.block_stages):
    groups[block.module_name] = f"stage{stage}"
  for name in ("final_conv", "final_bn"):
    if getattr(model, name, None) is not None:
      groups[getattr(model, name).module_name] = FINAL
  if model.classifier is not None:
    groups[model.classifier.module_name] = HEAD
  return groups


def parameter_groups(model: hk.Module,
                     params: Mapping[str, Mapping[str, Any]]) -> Any:
  """The group (`stem`, `stage<i>`, `final`, `head`) of each parameter.

  Args:
    model: the model the parameters are of (constructed, not run).
    params: its Haiku params tree `{module: {name: array}}`.

  Returns:
    A tree of group names with the structure of `params`.

  Raises:
    ValueError: for a parameter of no group (a model whose parts are named
      otherwise), naming it.
  """
  groups = module_groups(model)
  root = model.module_name
  root_groups = getattr(model, "root_parameter_groups", {})

  def group(module: str, name: str) -> str:
    if module == root and name in root_groups:
      return root_groups[name]
    path = module
    while path not in groups and "/~/" in path:
      path = path.rsplit("/~/", 1)[0]
    if path not in groups:
      raise ValueError(f"parameter {module}/{name} is in no group of "
                       f"{root} (stem, stages, final, head)")
    return groups[path]

  return {module: {name: group(module, name) for name in leaves}
          for module, leaves in params.items()}
