"""Model registry: names such as `nfnet_f0`, `nfnet_f3plus`, `nf_resnet50`.

`create_model(name, **overrides)` builds the Haiku module (call it inside a
transform); `build_model(name, **overrides)` returns the transformed pair
`init(rng, images, is_training)` / `apply(params, state, rng, images,
is_training, return_metrics=False) -> (output, state)`. Every model is
transformed with state so that the BN baseline and the NF models share one
interface; the NF models' state is empty.

Suffix `_nows` gives the same model with plain convs instead of Scaled WS (the
signal-propagation control), e.g. `nf_resnet50_nows`.
"""

import functools
import inspect
from typing import Callable

import haiku as hk

from nfnets.models.nf_resnet import DEPTHS as RESNET_DEPTHS
from nfnets.models.nf_resnet import NFResNet
from nfnets.models.nfnet import NFNet
from nfnets.models.nfnet import VARIANTS as NFNET_VARIANTS
from nfnets.models.nfnet import parse_variant
from nfnets.models.resnet import ResNet


def _registry() -> dict[str, Callable[..., hk.Module]]:
  names = {}
  for k in range(len(NFNET_VARIANTS)):
    names[f"nfnet_f{k}"] = functools.partial(NFNet, variant=f"F{k}")
    names[f"nfnet_f{k}plus"] = functools.partial(NFNet, variant=f"F{k}+")
  for depth in RESNET_DEPTHS:
    names[f"nf_resnet{depth}"] = functools.partial(NFResNet, depth=depth)
    names[f"resnet{depth}"] = functools.partial(ResNet, depth=depth)
  for name in [n for n in names if n.startswith("nf")]:
    names[f"{name}_nows"] = functools.partial(names[name], standardize=False)
  return names


MODELS: dict[str, Callable[..., hk.Module]] = _registry()


def get_constructor(name: str) -> Callable[..., hk.Module]:
  """Returns the module constructor registered under `name`."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
  return MODELS[name]


def create_model(name: str, **overrides) -> hk.Module:
  """Creates the named Haiku module (inside a transform) with overrides."""
  constructor = get_constructor(name)
  valid = inspect.signature(constructor).parameters
  for key in overrides:
    if key not in valid or key == "name":
      raise ValueError(f"unknown option {key!r} for model {name!r}; valid: "
                       f"{', '.join(k for k in valid if k != 'name')}")
  if overrides.get("num_classes", 1) < 1:
    raise ValueError(f"num_classes must be positive, got "
                     f"{overrides['num_classes']}")
  return constructor(**overrides)


def build_model(name: str, **overrides) -> hk.TransformedWithState:
  """Returns init/apply of the named model; see the module docstring."""
  get_constructor(name)  # fail early on an unknown name

  def forward(images, is_training: bool, return_metrics: bool = False):
    return create_model(name, **overrides)(images, is_training=is_training,
                                           return_metrics=return_metrics)

  return hk.transform_with_state(forward)


def image_sizes(name: str) -> tuple[int, int]:
  """(train, test) resolution of a model: the NFNet table, else 224/224."""
  get_constructor(name)
  if name.startswith("nfnet_f"):
    variant = name[len("nfnet_"):].split("_")[0].replace("plus", "+")
    row, _ = parse_variant(variant)
    return row.train_image_size, row.test_image_size
  return 224, 224
