"""Prints a model's parameter count and GMACs without allocating it.

  python scripts/summary.py --model=nfnet_f0 [--image_size=256] [--json]

GMACs are the multiply-adds of convolutions and dense layers for one image at
the given resolution (default: the model's test resolution), as in the NFNet
paper's tables.
"""

import json
import os
import sys

from absl import app
from absl import flags

# Runnable from a clone without installing: the repo root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets.models import summary  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", "nfnet_f0", "Registered model name.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Input resolution; default the model's test size.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier width.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    info = summary.summarize(_MODEL.value, _IMAGE_SIZE.value,
                             num_classes=_NUM_CLASSES.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if _JSON.value:
    print(json.dumps(info))
  else:
    print(f"{info['model']}: {info['params']:,} parameters, "
          f"{info['gmacs']:.2f} GMACs at {info['image_size']}x"
          f"{info['image_size']}")


if __name__ == "__main__":
  app.run(main)
