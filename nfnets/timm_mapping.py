"""timm's NFNet state dicts <-> this project's params trees, key for key.

Pure numpy (tensors or anything with a shape); `timm_weights` reads and
writes the files. Two kinds of tree:

- DeepMind's (`models/nfnet.py`, root `NFNet`) for timm's
  `dm_nfnet_f0..f6`: `stem.convK` -> `stem_conv{K-1}`; block j of stage s
  -> `nf_block_N` (N counted over the stages), its `conv1 conv2 conv2b
  conv3 downsample.conv` -> `conv0 conv1 conv1b conv2 conv_shortcut`, the
  SE's 1x1 convs `attn_last.fc1/fc2` -> the dense `squeeze_excite/~/linear,
  linear_1`, `skipinit_gain` -> `skip_gain`, `head.fc` -> `linear`. timm's
  dm_nfnet pads SAME and keeps gamma in the activation and the gains as
  DeepMind does, but its 'gelu' is the exact (erf) GELU, not DeepMind's
  tanh approximation, and its WS adds eps 1e-5 to the variance instead of
  flooring N * var at 1e-4: loaded here, the weights compute DeepMind's
  function, close to timm's but not equal (tests/test_timm_weights.py).
- timm's own (`NFNetLight` for `nfnet_l0`, `eca_nfnet_l*`; `NFResNetTimm`
  for `nf_resnet*`, `nf_seresnet*`, `nf_ecaresnet*`), key for key
  (`nfnet_light.haiku_name`): no skip gain, the branch's last conv has
  timm's zero-initialised gain instead.

Conv kernels OIHW <-> HWIO, dense [out, in] <-> [in, out], ECA's OIW <->
WIO, gains [O, 1, 1, 1] <-> [O]; biases and scalars as they are.
"""

import re
from typing import Any, Mapping

import numpy as np

from nfnets.models import nf_resnet_timm
from nfnets.models import nfnet_light

Params = dict[str, dict[str, Any]]
StateDict = dict[str, np.ndarray]
_DM_DEPTHS = (1, 2, 6, 3)  # F0's; F(k) has k + 1 times as many
_DM_MODULES = {"conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b",
               "conv3": "conv2", "downsample.conv": "conv_shortcut",
               "attn_last.fc1": "squeeze_excite/~/linear",
               "attn_last.fc2": "squeeze_excite/~/linear_1"}
_DM_BACK = {ours: key for key, ours in _DM_MODULES.items()}
_BLOCK = re.compile(r"stages\.(\d+)\.(\d+)\.(.+)$")
_ORDER = {t: i for i, t in enumerate((
    "stem", "stages", "skipinit_gain", "downsample", "conv1", "conv2",
    "conv2b", "conv3", "conv4", "attn_last", "final_conv", "head", "weight",
    "bias", "gain"))}
_DM_BLOCK = re.compile(r"nf_block(?:_(\d+))?(?:/~/(.+))?$")


def family(state: Mapping[str, Any]) -> str:
  """The root module of our tree for a timm state dict."""
  if "stem.conv1.weight" in state:
    dm = any(k.endswith(".skipinit_gain") for k in state)
    return "NFNet" if dm else "NFNetLight"
  if "stem.conv.weight" in state:
    if np.shape(state["stem.conv.weight"])[-1] == 7:
      return "NFResNetTimm"
    raise ValueError("it holds a timm NF-RegNet (3x3 stem): not mapped")
  raise ValueError("it is not a timm NFNet or NF-ResNet state dict (no "
                   "stem.conv1.weight or stem.conv.weight)")


def depths(keys) -> tuple[int, ...]:
  """Blocks per stage of a timm state dict (from its `stages.s.j.` keys)."""
  blocks: dict[int, set[int]] = {}
  for key in keys:
    match = _BLOCK.match(key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  return tuple(len(blocks.get(s, ())) for s in range(len(blocks)))


def identify(state: Mapping[str, Any]) -> str:
  """timm's name for the model of a state dict (by family, depths, SE/ECA)."""
  root, blocks_per_stage = family(state), depths(state)
  eca = any(k.endswith(".attn_last.conv.weight") for k in state)
  if root == "NFNet":
    names = {f"dm_nfnet_f{k}": tuple(d * (k + 1) for d in _DM_DEPTHS)
             for k in range(7)}
  elif root == "NFNetLight":
    names = {n: v.depths for n, v in nfnet_light.VARIANTS.items()
             if (v.attention == "eca") == eca}
  else:
    se = any(k.endswith(".attn_last.fc1.weight") for k in state)
    attention = "eca" if eca else "se" if se else ""
    names = {f"nf_{attention}resnet{d}": blocks
             for d, blocks in nf_resnet_timm.DEPTHS.items()}
  for name, blocks in names.items():
    if tuple(blocks) == blocks_per_stage:
      return name
  raise ValueError(f"no timm {root} has {blocks_per_stage} blocks per stage")


def _dm_key_to_haiku(key: str, value, starts) -> tuple[str, str, Any]:
  block = _BLOCK.match(key)
  if block:
    n = starts[int(block[1])] + int(block[2])
    path = "NFNet/~/nf_block" + (f"_{n}" if n else "")
    if block[3] == "skipinit_gain":
      return path, "skip_gain", np.reshape(value, ())
    module, param = block[3].rsplit(".", 1)
    path += "/~/" + _DM_MODULES[module]
  else:
    module, param = key.rsplit(".", 1)
    stem = re.fullmatch(r"stem\.conv([1-4])", module)
    path = "NFNet/~/" + (f"stem_conv{int(stem[1]) - 1}" if stem else
                         {"final_conv": "final_conv", "head.fc": "linear"
                          }[module])
  dense = path.endswith(("linear", "linear_1"))
  name = {"weight": "w", "gain": "gain",
          "bias": "b" if dense else "bias"}[param]
  if param == "gain":
    return path, name, np.reshape(value, (-1,))
  if param == "weight":
    if dense and np.ndim(value) == 4:  # the SE's 1x1 conv
      value = np.transpose(value[:, :, 0, 0])
    else:
      value = np.transpose(value, {4: (2, 3, 1, 0), 2: (1, 0)}[np.ndim(value)])
  return path, name, value


def to_haiku(state: Mapping[str, Any]) -> Params:
  """A timm state dict -> our params tree (see the module docstring)."""
  root = family(state)
  starts = np.cumsum((0,) + depths(state))
  params: Params = {}
  for key, value in state.items():
    try:
      if root == "NFNet":
        module, name, array = _dm_key_to_haiku(key, value, starts)
      else:
        module, name = nfnet_light.haiku_name(key, root)
        array = nfnet_light.haiku_array(key, value)
    except (KeyError, ValueError):
      raise ValueError(f"tensor {key!r} {list(np.shape(value))} has no place "
                       f"in this project's {root}") from None
    params.setdefault(module, {})[name] = array
  return params


def _timm_views(params: Mapping[str, Mapping[str, Any]]):
  """Yields (timm key, array view) for our params; see `to_timm`."""
  roots = {module.split("/~/")[0] for module in params}
  if len(roots) != 1 or not roots & {"NFNet", "NFNetLight", "NFResNetTimm"}:
    raise ValueError(f"params of {', '.join(sorted(roots))} have no timm "
                     "counterpart (timm-mapped roots: NFNet, NFNetLight, "
                     "NFResNetTimm)")
  root = roots.pop()
  position = {}  # DeepMind's tree: block number -> (stage, index)
  stage, start = -1, 0
  for n in sorted(int(m[1] or 0) for m in (_DM_BLOCK.match(
      p[len(root) + 3:]) for p in params) if m and not m[2]):
    if f"{root}/~/nf_block{f'_{n}' if n else ''}/~/conv_shortcut" in params:
      stage, start = stage + 1, n
    position[n] = (max(stage, 0), n - start)
  for module, leaves in params.items():
    sub = module[len(root) + 3:]
    for name, value in leaves.items():
      block = _DM_BLOCK.match(sub) if root == "NFNet" else None
      if block:
        prefix = "stages.{}.{}".format(*position[int(block[1] or 0)])
        if block[2] is None:
          yield f"{prefix}.skipinit_gain", np.reshape(value, ())
          continue
        key = f"{prefix}.{_DM_BACK[block[2]]}"
      elif root == "NFNet":
        stem = re.fullmatch(r"stem_conv(\d)", sub)
        key = (f"stem.conv{int(stem[1]) + 1}" if stem else
               {"final_conv": "final_conv", "linear": "head.fc"}[sub])
      else:
        key = "head.fc" if sub == "linear" else re.sub(
            r"_(\d+)", r".\1", sub.replace("/~/", "."))
      key += "." + {"w": "weight", "b": "bias", "bias": "bias",
                    "gain": "gain"}[name]
      if name == "gain":
        yield key, np.reshape(value, (-1, 1, 1, 1))
      elif name == "w" and key.startswith("stages.") and ".attn_last.fc" in \
          key and np.ndim(value) == 2:  # DeepMind's dense SE: 1x1 convs
        yield key, np.transpose(value)[:, :, None, None]
      elif name == "w":
        yield key, np.transpose(value, {4: (3, 2, 0, 1), 3: (2, 1, 0),
                                        2: (1, 0)}[np.ndim(value)])
      else:
        yield key, value


def _timm_dict(params, convert) -> dict[str, Any]:
  try:
    return {key: convert(value) for key, value in sorted(
        _timm_views(params), key=lambda item: timm_order(item[0]))}
  except KeyError as e:
    raise ValueError(f"the params have a module or parameter timm's model "
                     f"does not: {e}") from None


def timm_order(key: str) -> list:
  """Sorts state-dict keys as timm's models list them (stem, stages in
  order, each block's modules, final conv, head; weight, bias, gain)."""
  return [(0, int(t), "") if t.isdigit() else
          (1, _ORDER.get(t, len(_ORDER)), t) for t in key.split(".")]


def to_timm(params: Mapping[str, Mapping[str, Any]]) -> StateDict:
  """Our params tree -> timm's state dict (float32, C-contiguous)."""
  # (Not np.ascontiguousarray: it makes a 0-d skip gain 1-d.)
  return _timm_dict(params, lambda v: np.asarray(v, np.float32, order="C"))


def timm_shapes(params: Mapping[str, Mapping[str, Any]]
                ) -> dict[str, tuple[int, ...]]:
  """timm's key -> shape for params of any leaves with a `.shape`."""
  blank = {m: {n: np.broadcast_to(np.float32(0), np.shape(v))
               for n, v in leaves.items()} for m, leaves in params.items()}
  return _timm_dict(blank, lambda v: tuple(np.shape(v)))
