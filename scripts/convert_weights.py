"""Converts weights between DeepMind's released format, safe .npz, timm and runs.

  # One-time: a released pickle to a safe .npz that loads without unpickling.
  python scripts/convert_weights.py --input=F0_haiku.npz --output=F0.safe.npz
  # Export a run of this project (EMA weights) in the released layout.
  python scripts/convert_weights.py --input=WORKDIR --output=my_F0_haiku.npz \
      --format=released
  # To timm (PyTorch): what timm.create_model('dm_nfnet_f0') loads strictly.
  python scripts/convert_weights.py --input=F0_haiku.npz \
      --output=dm_nfnet_f0.safetensors --format=timm --model=nfnet_f0
  # A timm .pth to .safetensors (needs torch here, not where it is used).
  python scripts/convert_weights.py --input=eca_nfnet_l0.pth \
      --output=eca_nfnet_l0.safetensors --format=timm --model=eca_nfnet_l0

`--input` is a released file, a safe .npz, a timm `.safetensors` / `.pth`
or a project workdir/checkpoint (formats told apart by content). With
`--format=timm`, `--model` (this project's name, e.g. `nfnet_f0`,
`eca_nfnet_l0`, `nf_resnet50_timm`) checks that the output is exactly the
state dict of its timm counterpart (`nfnets.timm_weights.TIMM_NAMES`), as
`load_state_dict(..., strict=True)` needs; without it, the mapped tensors
are written unchecked (e.g. for a model of other widths).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets import released_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import timm_mapping  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import timm_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import weights_io  # pylint: disable=g-import-not-at-top,wrong-import-position

_INPUT = flags.DEFINE_string("input", None, "Weights file or workdir.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "File to write.", required=True)
_FORMAT = flags.DEFINE_enum("format", "safe", ["safe", "released", "timm"],
                            "safe: .npz of named arrays; released: the "
                            "pickle layout of DeepMind's files; timm: a "
                            "safetensors state dict of timm's model.")
_MODEL = flags.DEFINE_string(
    "model", None, "This project's model name: checks a timm input against "
    "it and, with --format=timm, the output against its timm counterpart.")
_RAW = flags.DEFINE_bool("raw", False, "Take a run's raw weights, not EMA.")


def convert(source: str, output: str, fmt: str = "safe",
            model: str | None = None, raw: bool = False) -> str:
  """Converts `source` into `output`; returns a one-line summary."""
  if os.path.exists(output):
    raise ValueError(f"{output} exists; not overwriting it")
  if fmt == "timm" and model is not None and model not in \
      timm_weights.TIMM_NAMES:
    raise ValueError(timm_weights.no_counterpart(model))
  loaded = weights_io.load_weights(source, model)
  params = loaded["params" if raw else "ema_params"]
  count = sum(v.size for leaves in params.values() for v in leaves.values())
  if fmt == "timm":
    state = timm_weights.save(params, output, model, source=source)
    try:
      name = f"timm's {timm_mapping.identify(state)}"
    except ValueError:  # e.g. a tiny model
      name = (f"a timm {timm_mapping.family(state)} with "
              f"{timm_mapping.depths(state)} blocks per stage")
    checked = "checked" if model else "unchecked: no --model"
    return (f"wrote {output}: {name} ({checked}), {len(state)} tensors, "
            f"{count:,} parameters (safetensors)")
  save = (released_weights.save_safe if fmt == "safe" else
          released_weights.save_released)
  save(params, output)
  return (f"wrote {output}: {len(params)} modules, {count:,} parameters "
          f"({fmt} format)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    print(convert(_INPUT.value, _OUTPUT.value, _FORMAT.value, _MODEL.value,
                  _RAW.value))
  except (ValueError, OSError) as e:  # OSError: e.g. no such output folder
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
