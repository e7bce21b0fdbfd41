"""The preprocessing that travels with each family of weights.

Weights are only as good as the images they are given: each family is
evaluated as its publisher evaluated it. DeepMind's released F0-F6 (and
this project's own models by default): squash-resize to S + 32 with TF's
bicubic (not antialiased), centre crop S at the variant's test size,
ImageNet's mean and std (the released code's `eval_preproc='resize_crop_32'`;
SPEC.md). timm's weights: each model's `pretrained_cfg` in timm 1.0.31
(`_TIMM_CFGS`, checked against timm by scripts/timm_fixture.py), with PIL's
antialiased bicubic, which timm's transforms use. `scripts/predict.py` and
the configs' `dataset.eval_preproc` / `eval_interpolation` /
`eval_image_size` take them from `preprocessing(model, weights_format)`.
"""

import dataclasses

from nfnets import timm_weights
from nfnets.models import nf_resnet_timm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a weight family's evaluation images are made.

  Attributes:
    source: whose setting it is.
    image_size, test_size: train and evaluation resolutions (timm's
      `input_size`, `test_input_size`).
    crop, test_crop: the crop at each, as `transforms.EvalPreproc.pct`:
      > 1 pixels added before cropping (DeepMind's S + 32), else the
      crop fraction (timm's `crop_pct`, `test_crop_pct`).
    crop_mode: 'squash' (resize the whole image to S / fraction, aspect
      ignored, take the centre S) or 'center' (the centred square of the
      shorter side, resized to S).
    interpolation: 'bicubic' (not antialiased, as TF: DeepMind's) or
      'bicubic_antialias' (PIL's BICUBIC, which timm's transforms use).
    mean, std: per RGB channel, on the 0-1 scale.
  """
  source: str
  image_size: int
  test_size: int
  crop: float
  test_crop: float
  crop_mode: str
  interpolation: str
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  @property
  def eval_preproc(self) -> str:
    """The config's `dataset.eval_preproc` at the test size."""
    mode = "resize_crop" if self.crop_mode == "squash" else "crop_resize"
    return f"{mode}_{self.test_crop:g}"

  def dataset_overrides(self) -> dict[str, object]:
    """The `config.dataset` values that evaluate as the publisher did."""
    return {"eval_image_size": self.test_size,
            "eval_preproc": self.eval_preproc,
            "eval_interpolation": self.interpolation}


# timm 1.0.31's pretrained_cfg (scripts/timm_fixture.py checks these):
# name: (tag, input size, test size, crop_pct, test_crop_pct, crop_mode).
# All 'bicubic' (PIL's) with ImageNet's mean and std; None: no test_*.
_TIMM_CFGS = {
    "dm_nfnet_f0": ("dm_in1k", 192, 256, 0.9, None, "squash"),
    "dm_nfnet_f1": ("dm_in1k", 224, 320, 0.91, None, "squash"),
    "dm_nfnet_f2": ("dm_in1k", 256, 352, 0.92, None, "squash"),
    "dm_nfnet_f3": ("dm_in1k", 320, 416, 0.94, None, "squash"),
    "dm_nfnet_f4": ("dm_in1k", 384, 512, 0.951, None, "squash"),
    "dm_nfnet_f5": ("dm_in1k", 416, 544, 0.954, None, "squash"),
    "dm_nfnet_f6": ("dm_in1k", 448, 576, 0.956, None, "squash"),
    "nfnet_l0": ("ra2_in1k", 224, 288, 0.9, 1.0, "center"),
    "eca_nfnet_l0": ("ra2_in1k", 224, 288, 0.9, 1.0, "center"),
    "eca_nfnet_l1": ("ra2_in1k", 256, 320, 0.9, 1.0, "center"),
    "eca_nfnet_l2": ("ra3_in1k", 320, 384, 0.9, 1.0, "center"),
    "eca_nfnet_l3": (None, 352, 448, 0.9, 1.0, "center"),
    "nf_resnet50": ("ra2_in1k", 256, 288, 0.94, None, "center"),
    **{f"nf_{a}resnet{d}": (None, 224, None, 0.9, None, "center")
       for a in ("", "se", "eca") for d in nf_resnet_timm.DEPTHS
       if (a, d) != ("", 50)},
}
TIMM_PREPROCESSING: dict[str, Preprocessing] = {
    name: Preprocessing(
        f"timm's {name}.{tag}" if tag else f"timm's {name} (no weights)",
        size, test or size, crop, test_crop or crop, mode,
        "bicubic_antialias")
    for name, (tag, size, test, crop, test_crop, mode) in _TIMM_CFGS.items()}


def preprocessing(model: str, weights_format: str = "") -> Preprocessing:
  """The preprocessing that goes with `model`'s weights.

  timm's `pretrained_cfg` for a timm file (`weights_format` 'safetensors'
  or 'torch') and for timm-structured models; DeepMind's release (squash
  to S + 32, centre crop S at the test size, TF bicubic) otherwise.
  """
  from nfnets import models  # pylint: disable=g-import-not-at-top
  timm_name = timm_weights.TIMM_NAMES.get(model.removesuffix("_nows"))
  if timm_name and (weights_format in timm_weights.TIMM_FORMATS or
                    not timm_name.startswith("dm_")):
    return TIMM_PREPROCESSING[timm_name]
  train, test = models.image_sizes(model)
  return Preprocessing("DeepMind's release (eval_preproc='resize_crop_32')",
                       train, test, 32.0, 32.0, "squash", "bicubic")
