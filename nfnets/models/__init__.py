"""Model registry: names such as `nfnet_f0`, `nfnet_f3plus`, `nf_resnet50`.

`create_model(name, **overrides)` builds the Haiku module (call it inside a
transform); `build_model(name, **overrides)` returns the transformed pair
`init(rng, images, is_training)` / `apply(params, state, rng, images,
is_training, return_metrics=False, return_features=False) -> (output,
state)`. Every model is transformed with state so that the BN baseline and
the NF models share one interface; the NF models' state is empty.

Backbones (`common` has the design): `num_classes=0` builds a headless
model whose output is the pooled pre-logits; `return_features=True` makes
the output `(output, {feature: array})` (after the metrics when both are
asked for); `feature_info(name, **overrides)` lists the features with
their channels and strides without running the model; `output_stride=16`
or `8` dilates the last stages; `parameter_groups(name, params)` says which
of `stem`, `stage<i>`, `final`, `head` each parameter belongs to (for
freezing, `nfnets.training.optim`).

Suffix `_nows` gives the same model with plain convs instead of Scaled WS (the
signal-propagation control), e.g. `nf_resnet50_nows`.

`model_options(name)` lists what an experiment config may set for a model
(`config.model.kwargs`), `option_types(name)` the type each takes on a command
line and `check_options(name, options)` rejects what the model does not take.
"""

import collections.abc
import functools
import inspect
import types
import typing
from typing import Any, Callable, Mapping

import haiku as hk

from nfnets.models import common
from nfnets.models import nf_regnet
from nfnets.models import nf_resnet_timm
from nfnets.models import nfnet_light
from nfnets.models import resnet_baselines
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
    names[f"skipinit_resnet{depth}"] = functools.partial(
        resnet_baselines.SkipInitResNet, depth=depth)
    names[f"fixup_resnet{depth}"] = functools.partial(
        resnet_baselines.FixupResNet, depth=depth)
  for variant in nf_regnet.VARIANTS:
    names[f"nf_regnet_{variant.lower()}"] = functools.partial(
        nf_regnet.NFRegNet, variant=variant)
  for variant in nfnet_light.VARIANTS:
    names[variant] = functools.partial(nfnet_light.NFNetLight,
                                       variant=variant)
  for depth in nf_resnet_timm.DEPTHS:
    for attention in nf_resnet_timm.ATTENTIONS:
      names[f"nf_{attention}resnet{depth}"] = functools.partial(
          nf_resnet_timm.NFResNetTimm, depth=depth, attention=attention)
    # timm's plain nf_resnet50 is not DeepMind's (nf_resnet50 above).
    names[f"nf_resnet{depth}_timm"] = functools.partial(
        nf_resnet_timm.NFResNetTimm, depth=depth, attention=None)
  for name in [n for n in names if n.startswith("nf")]:
    names[f"{name}_nows"] = functools.partial(names[name], standardize=False)
  # eca_nfnet_* are NF models too: the same no-WS control.
  for name in [n for n in nfnet_light.VARIANTS if not n.startswith("nf")]:
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
  return constructor(**overrides)


# Set elsewhere than in a config's model options: num_classes from the
# dataset, name by Haiku, output_stride by a dense-prediction user of the
# backbone (`build_model`), not by the classification trainer.
_NOT_OPTIONS = ("num_classes", "name", "output_stride")


def _bound(name: str) -> dict[str, Any]:
  """The arguments the registry fixes for `name` (variant, depth, ...)."""
  # functools.partial flattens nested partials, so this holds all of them.
  return dict(getattr(get_constructor(name), "keywords", {}))


def _parameters(name: str) -> dict[str, inspect.Parameter]:
  bound = _bound(name)
  return {k: p for k, p in
          inspect.signature(get_constructor(name), eval_str=True)
          .parameters.items()
          if k not in _NOT_OPTIONS and k not in bound}


def model_options(name: str) -> dict[str, Any]:
  """The options of a model and their defaults, as a config sets them.

  These are the keyword arguments of the registered constructor except
  `num_classes` (an experiment takes it from its dataset), `name` and those
  the name itself fixes (`variant` for `nfnet_f*`, `depth` for
  `nf_resnet*`/`resnet*`, `standardize` for `*_nows`).

  Args:
    name: a registered model name, e.g. `nfnet_f0`.

  Returns:
    {option: default value}, in the constructor's order; a None default means
    the model picks the value (e.g. NFNet's per-variant `dropout_rate`).

  Raises:
    ValueError: for an unknown model name.
  """
  return {k: p.default for k, p in _parameters(name).items()}


def _command_line_type(annotation: Any, default: Any) -> type | None:
  """The type a command line gives an option: its default's, if a literal."""
  if isinstance(default, (bool, int, float, str, tuple)):
    return type(default)
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    choices = [a for a in typing.get_args(annotation) if a is not type(None)]
    # An activation is a name or a function: only a name fits on a command
    # line.
    if str in choices:
      return str
    if len(choices) == 1:
      return _command_line_type(choices[0], None)
    return None
  if annotation in (bool, int, float, str):
    return annotation
  if (annotation is tuple or origin is tuple or
      (isinstance(origin, type) and
       issubclass(origin, collections.abc.Sequence))):
    return tuple
  return None


def option_types(name: str) -> dict[str, type]:
  """The type each option of a model takes from a command line.

  That of its default, or for a None default the annotated type: `float`
  for `float | None`, `tuple` for a sequence, `str` for a name-or-function
  such as an activation.

  Args:
    name: a registered model name.

  Returns:
    {option: type}, with the keys of `model_options(name)`.

  Raises:
    ValueError: for an unknown model name.
    TypeError: for an option with no command-line type (a constructor
      argument this function does not know how to spell as text).
  """
  result = {}
  for key, parameter in _parameters(name).items():
    kind = _command_line_type(parameter.annotation, parameter.default)
    if kind is None:
      raise TypeError(f"option {key!r} of model {name!r} has no command-line "
                      f"type (annotation {parameter.annotation})")
    result[key] = kind
  return result


def check_options(name: str, options: Mapping[str, Any]) -> None:
  """Raises ValueError unless the model takes every option in `options`.

  Options are those of `model_options(name)`; one the name fixes (e.g.
  `standardize` of a `_nows` model) is accepted only with the same value, so
  that a config written for `nf_resnet50` cannot turn `nf_resnet50_nows`
  back into the standardized model.

  Args:
    name: a registered model name.
    options: the options a config passes to the model.

  Raises:
    ValueError: for an unknown model name, an option the model does not take
      (naming the valid ones) or one that contradicts the name.
  """
  valid = model_options(name)
  bound = _bound(name)
  for key, value in options.items():
    if key in bound:
      if value != bound[key]:
        raise ValueError(
            f"option {key}={value!r} contradicts model {name!r}, which sets "
            f"{key}={bound[key]!r}; set it to {bound[key]!r} or pick "
            "another model")
    elif key not in valid:
      raise ValueError(f"unknown option {key!r} for model {name!r}; valid: "
                       f"{', '.join(valid)}")


def build_model(name: str, **overrides) -> hk.TransformedWithState:
  """Returns init/apply of the named model; see the module docstring."""
  get_constructor(name)  # fail early on an unknown name

  def forward(images, is_training: bool, return_metrics: bool = False,
              return_features: bool = False):
    return create_model(name, **overrides)(
        images, is_training=is_training, return_metrics=return_metrics,
        return_features=return_features)

  return hk.transform_with_state(forward)


def _constructed(name: str, read: Callable[[hk.Module], Any],
                 **overrides) -> Any:
  """What `read` takes from the model, constructed but not run."""
  return hk.transform(lambda: read(create_model(name, **overrides))).apply(
      {}, None)


def feature_info(name: str, **overrides) -> list[dict[str, Any]]:
  """The features `return_features=True` gives, without running the model.

  Args:
    name: a registered model name.
    **overrides: model options (`output_stride`, `width_multiplier`, ...).

  Returns:
    [{'name', 'channels', 'stride'}, ...] in network order: `stem`,
    `stage0` ... `stage3`, `final_conv` (models that have one), and
    `pre_logits` (pooled: stride None).
  """
  return _constructed(name, lambda m: m.feature_info, **overrides)


def parameter_groups(name: str, params: Mapping[str, Mapping[str, Any]],
                     **overrides) -> Any:
  """Each parameter's group: `stem`, `stage<i>`, `final` or `head`.

  Taken from the model's own module paths (`common.parameter_groups`): the
  stem's modules (NFNet `stem_conv*`, NF-ResNet/ResNet `initial_conv`, timm
  families `stem`), each block (`nf_block_<k>`, `stages_<i>_<j>`, ...) by
  the stage it was built in, the final conv or BN, and the classifier
  `linear` (plus Fixup's root scalars `bias1`, `bias2`).

  Args:
    name: a registered model name.
    params: the model's params tree (arrays or shapes).
    **overrides: the options it was built with.

  Returns:
    A tree of group names with the structure of `params`.
  """
  return _constructed(name, lambda m: common.parameter_groups(m, params),
                      **overrides)


def image_sizes(name: str) -> tuple[int, int]:
  """(train, test) resolution.

  The NFNet or NF-RegNet table; for timm-structured models (light NFNets,
  timm's NF-ResNets) timm's `pretrained_cfg` (`weight_preprocessing`);
  else 224/224.
  """
  # Lazily: these modules import the models.
  from nfnets import timm_weights  # pylint: disable=g-import-not-at-top
  from nfnets import weight_preprocessing  # pylint: disable=g-import-not-at-top
  get_constructor(name)
  if name.startswith("nf_regnet_"):
    row = nf_regnet.parse_variant(name[len("nf_regnet_"):].split("_")[0])
    return row.train_image_size, row.test_image_size
  timm_name = timm_weights.TIMM_NAMES.get(name.removesuffix("_nows"), "")
  if timm_name and not timm_name.startswith("dm_"):
    timm_cfg = weight_preprocessing.TIMM_PREPROCESSING[timm_name]
    return timm_cfg.image_size, timm_cfg.test_size
  if name.startswith("nfnet_f"):
    variant = name[len("nfnet_"):].split("_")[0].replace("plus", "+")
    row, _ = parse_variant(variant)
    return row.train_image_size, row.test_image_size
  return 224, 224
