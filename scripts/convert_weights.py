"""Converts weights between DeepMind's released format, safe .npz and runs.

  # One-time: a released pickle to a safe .npz that loads without unpickling.
  python scripts/convert_weights.py --input=F0_haiku.npz --output=F0.safe.npz
  # Export a run of this project (EMA weights) in the released layout.
  python scripts/convert_weights.py --input=WORKDIR --output=my_F0_haiku.npz \
      --format=released

`--input` is a released file, a safe .npz or a project workdir/checkpoint.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets import released_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position

_INPUT = flags.DEFINE_string("input", None, "Weights file or workdir.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "File to write.", required=True)
_FORMAT = flags.DEFINE_enum("format", "safe", ["safe", "released"],
                            "safe: .npz of named arrays; released: the "
                            "pickle layout of DeepMind's files.")
_RAW = flags.DEFINE_bool("raw", False, "Take a run's raw weights, not EMA.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if os.path.exists(_OUTPUT.value):
      raise ValueError(f"{_OUTPUT.value} exists; not overwriting it")
    loaded = checkpoint.load_weights(_INPUT.value)
    params = loaded["params" if _RAW.value else "ema_params"]
    save = (released_weights.save_safe if _FORMAT.value == "safe" else
            released_weights.save_released)
    save(params, _OUTPUT.value)
  except (ValueError, OSError) as e:  # OSError: e.g. no such output folder
    raise SystemExit(f"error: {e}") from None
  count = sum(v.size for leaves in params.values() for v in leaves.values())
  print(f"wrote {_OUTPUT.value}: {len(params)} modules, {count:,} parameters "
        f"({_FORMAT.value} format)")


if __name__ == "__main__":
  app.run(main)
