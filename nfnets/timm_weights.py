"""timm's NFNet weights: read without PyTorch, check, export.

timm (pytorch-image-models, `timm/models/nfnet.py`) publishes NFNet weights
as PyTorch state dicts: `.safetensors` on the Hugging Face hub, `.pth` in
older releases. `load` reads both (safetensors through the `safetensors`
package's numpy API; a `.pth` only where torch is installed) and maps them
onto this project's params (`timm_mapping`, which says tensor for tensor
how); `save` writes params as the safetensors state dict that
`timm.create_model(name).load_state_dict(sd, strict=True)` takes. A file's
format is told from its content (`detect_format`), not its name.

`TIMM_NAMES` pairs our models with timm's: `nfnet_f0..f6` with
`dm_nfnet_f0..f6` (DeepMind's weights, as timm republished them),
`nfnet_l0`, `eca_nfnet_l0..l3`, `nf_seresnet*` and `nf_ecaresnet*` with
their namesakes, and timm's plain `nf_resnet26/50/101` with our
`nf_resnet26_timm/...` (our `nf_resnet50` is DeepMind's NF-ResNet, another
function: strided-conv shortcuts, SAME padding, a skip gain). timm's
NF-RegNets are not mapped. The preprocessing of each family is in
`nfnets.weight_preprocessing`.
"""

import os
import struct
import zipfile
from typing import Any, Mapping, Optional

import numpy as np

from nfnets import released_weights
from nfnets import timm_mapping
from nfnets.models import nf_resnet_timm
from nfnets.models import nfnet_light

Params = released_weights.Params
StateDict = dict[str, np.ndarray]

TIMM_NAMES: dict[str, str] = {
    **{f"nfnet_f{k}": f"dm_nfnet_f{k}" for k in range(7)},
    **{name: name for name in nfnet_light.VARIANTS},
    **{f"nf_{a}resnet{d}": f"nf_{a}resnet{d}"
       for a in nf_resnet_timm.ATTENTIONS for d in nf_resnet_timm.DEPTHS},
    **{f"nf_resnet{d}_timm": f"nf_resnet{d}" for d in nf_resnet_timm.DEPTHS},
}
OUR_NAMES: dict[str, str] = {t: ours for ours, t in TIMM_NAMES.items()}
TIMM_FORMATS = ("safetensors", "torch")
# torch.save before PyTorch 1.6: a pickle that starts with a magic number.
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def detect_format(path: str) -> str:
  """'safetensors', 'torch', 'npz' or 'pickle' (DeepMind's released files).

  From the content: safetensors starts with its header's length (8 bytes,
  little-endian) and the header's JSON `{`; a PyTorch file is a zip holding
  a `data.pkl` (or, before PyTorch 1.6, a pickle with torch's magic number);
  a safe `.npz` is a zip of `.npy` files; the rest is read as a pickle.
  """
  if not os.path.isfile(path):
    raise ValueError(f"weights file {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(len(_LEGACY_TORCH))
  if (len(head) > 8 and head[8:9] == b"{" and
      struct.unpack("<Q", head[:8])[0] <= os.path.getsize(path) - 8):
    return "safetensors"
  if head.startswith(b"PK\x03\x04"):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except zipfile.BadZipFile:
      return "npz"  # np.load names the damage
    return ("torch" if any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names)
            else "npz")
  return "torch" if head == _LEGACY_TORCH else "pickle"


def read_state_dict(path: str) -> StateDict:
  """A timm file's tensors as float32 numpy arrays, by state-dict key."""
  kind = detect_format(path)
  if kind == "torch":
    state = _read_torch(path)
  elif kind == "safetensors":
    state = _read_safetensors(path)
  else:
    raise ValueError(f"{path} is not a PyTorch state dict (a {kind} file)")
  return {k.removeprefix("module."): np.asarray(v, np.float32)
          for k, v in state.items()}


def _read_safetensors(path: str) -> dict[str, Any]:
  from safetensors import flax as safetensors_jax  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    try:
      return safetensors_numpy.load_file(path)
    except KeyError:  # a dtype numpy lacks (BF16): through jax arrays
      return {k: np.asarray(v.astype(np.float32))
              for k, v in safetensors_jax.load_file(path).items()}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a readable safetensors file "
                     f"({type(e).__name__}: {e})") from None


def _read_torch(path: str) -> dict[str, Any]:
  """torch.load with weights_only; training checkpoints give their EMA."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        f"{path} is a PyTorch .pth file and torch is not installed: install "
        "it (pip install torch), or convert the file once where torch is: "
        f"python scripts/convert_weights.py --input={path} "
        "--output=model.safetensors --format=timm --model=NAME") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: torch cannot read it ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
  for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
      state = state[key]
      break
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state "
                     "dict")
  return {k: v.detach().cpu().float().numpy() for k, v in state.items()
          if hasattr(v, "detach")}


def no_counterpart(model: str) -> str:
  """Why `model` has no timm counterpart, in words."""
  base = model.removesuffix("_nows")
  if base != model:
    why = "timm has no NFNet without weight standardization"
  elif base in (f"nf_resnet{d}" for d in nf_resnet_timm.DEPTHS):
    why = (f"timm's {base} is another network, this project's {base}_timm "
           "(avg-pool shortcuts, symmetric padding, no skip gain)")
  elif base.startswith("nfnet_f"):
    why = "timm has DeepMind's F0-F6 only (dm_nfnet_f0 ... dm_nfnet_f6)"
  else:
    why = "timm's model of that name, if any, is not mapped"
  return f"model {model} has no timm counterpart: {why}"


def expected_shapes(model: str, num_classes: int = 1000,
                    **overrides) -> dict[str, tuple[int, ...]]:
  """The timm state dict (key -> shape) of our `model`, built abstractly."""
  import jax  # pylint: disable=g-import-not-at-top
  from nfnets import models  # pylint: disable=g-import-not-at-top
  if model not in TIMM_NAMES:
    raise ValueError(no_counterpart(model))
  net = models.build_model(model, num_classes=num_classes, **overrides)
  params, _ = jax.eval_shape(
      lambda x: net.init(jax.random.PRNGKey(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
  return timm_mapping.timm_shapes(params)


def first_misfit(have: Mapping[str, Any], want: Mapping[str, Any]
                 ) -> Optional[str]:
  """The first tensor where two state dicts' shapes differ, in words.

  Values are arrays or shapes (tuples); `want`'s order decides "first".
  """
  shape = lambda v: tuple(v) if isinstance(v, tuple) else np.shape(v)
  for key, wanted in want.items():
    if key not in have:
      return f"tensor {key!r} is missing (the model needs {list(wanted)})"
    if shape(have[key]) != shape(wanted):
      return (f"tensor {key!r} has shape {list(shape(have[key]))}, the "
              f"model needs {list(shape(wanted))}")
  extra = [key for key in have if key not in want]
  return f"tensor {extra[0]!r} is not in the model" if extra else None


def check_fits(state: Mapping[str, Any], model: str, source: str,
               **overrides) -> None:
  """One-line ValueError unless `state` is timm's state dict of `model`."""
  hint = ""
  try:
    found = timm_mapping.identify(state)
    if OUR_NAMES[found] != model:
      hint = (f" (it holds timm's {found}, this project's "
              f"{OUR_NAMES[found]})")
  except ValueError:
    pass
  if model not in TIMM_NAMES:
    raise ValueError(f"{source}: {no_counterpart(model)}{hint}")
  head = state.get("head.fc.weight")
  want = expected_shapes(model, 1000 if head is None else np.shape(head)[0],
                         **overrides)
  problem = first_misfit(state, want)
  if problem:
    raise ValueError(f"{source} does not fit {model} (timm's "
                     f"{TIMM_NAMES[model]}): {problem}{hint}")


def load(path: str, model: Optional[str] = None, **overrides) -> Params:
  """Reads a timm file as our params; with `model`, checks it fits first.

  Args:
    path: a `.safetensors` or `.pth` state dict of timm (see `TIMM_NAMES`).
    model: our registered name; `overrides` are its options (width, ...).

  Raises:
    ValueError, one line: unreadable files, a `.pth` without torch, a
      state dict of another model (naming the first tensor that differs).
  """
  state = read_state_dict(path)
  if model is not None:
    check_fits(state, model, path, **overrides)
  try:
    return timm_mapping.to_haiku(state)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def save(params: Mapping[str, Mapping[str, Any]], path: str,
         model: Optional[str] = None, source: Optional[str] = None,
         **overrides) -> StateDict:
  """Writes params as timm's safetensors state dict; returns the dict.

  With `model`, first checks that `timm.create_model(TIMM_NAMES[model])`
  (with the file's classes) takes it with `strict=True`; an error names
  `source` (where the params came from) and the first tensor that differs.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  state = timm_mapping.to_timm(params)
  metadata = {"format": "pt"}
  if model is not None:
    check_fits(state, model, source or f"the state dict for {path}",
               **overrides)
    metadata["timm_model"] = TIMM_NAMES[model]
  safetensors_numpy.save_file(state, path, metadata=metadata)
  return state
