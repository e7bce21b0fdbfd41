"""Writes the timm test fixtures of the timm-tree models (needs torch + timm).

  python scripts/timm_fixture.py [--out=tests/data]

Not a project dependency: run it in a separate environment with `pip install
torch timm safetensors` (timm 1.0.31 wrote the committed files; about a
minute). To regenerate: `python -m venv /tmp/timmenv && /tmp/timmenv/bin/pip
install torch timm safetensors && /tmp/timmenv/bin/python
scripts/timm_fixture.py`; the tiny models' logits come out the same as long
as their seeds and `TINY`'s order are kept. It writes

- `timm_fixture.json`: timm's version, the parameter count of every timm
  model the project rebuilds, the state-dict keys of `eca_nfnet_l0` and
  `dm_nfnet_f0` with their shapes (meta-device models: nothing allocated),
  a digest of every other mapped model's key -> shape list
  (`state_dict_digests`), each model's `pretrained_cfg` preprocessing
  (`pretrained_cfgs`), and for tiny versions of `eca_nfnet_l0`,
  `nfnet_l0`, `nf_ecaresnet26`, `nf_seresnet26`, `dm_nfnet_f0` and
  `nf_resnet50` (timm's own constructor options) their keys, shapes and
  the seed of their weights;
- `timm_tiny_logits.npz`: one input batch (`input`, NHWC, odd sizes) and
  each tiny model's logits for it in eval mode (`<model>`), plus
  `dm_nfnet_f0_stock`: timm's stock `dm_nfnet_f0` on the same weights.

The tiny `dm_nfnet_f0` computes DeepMind's function, which timm's stock
`dm_nfnet_f0` does not quite: timm's 'gelu' is the exact (erf) GELU where
the released code uses `jax.nn.gelu`'s tanh approximation (with the same
gamma, which timm is patched here to know for 'gelu_tanh'), and timm's WS
adds eps 1e-5 to the variance where DeepMind floors N * var at 1e-4
(`std_conv_eps=1e-10`, as PyTorch refuses 0, is the same to float32
rounding for any kernel with N * var > 1e-4).
`dm_nfnet_f0_stock` records how far apart the two are.

The tiny models' weights are not stored: `tiny_weights` draws them from
numpy's seeded generator, key by key in state-dict order (gains around 1
and biases around 0, perturbed so that every path reaches the output), and
the tests draw the same numbers with the same function.

tests/test_nfnet_light.py, tests/test_nf_resnet_timm.py and
tests/test_timm_weights.py read them.
"""

import argparse
import hashlib
import json
import pathlib
import re

import numpy as np
import timm
from timm.models import nfnet as timm_nfnet
import torch

COUNTED = ("nfnet_l0", "eca_nfnet_l0", "eca_nfnet_l1", "eca_nfnet_l2",
           "eca_nfnet_l3", "nf_seresnet26", "nf_seresnet50", "nf_seresnet101",
           "nf_ecaresnet26", "nf_ecaresnet50", "nf_ecaresnet101")
# timm's NfCfg fields as constructor options; the tests build the same
# models with the matching options of ours.
_LIGHT = dict(width_factor=0.125, group_size=8, depths=(1, 2, 1, 1))
# The stem of DeepMind's NFNet does not scale with the widths: tiny through
# the bottlenecks, depths and final conv instead.
_DM = dict(depths=(1, 2, 1, 1), group_size=16, bottle_ratio=0.0625,
           num_features=64)
# New entries go last: a model's seed is its place here.
TINY = {
    "eca_nfnet_l0": _LIGHT,
    "nfnet_l0": _LIGHT,
    "nf_ecaresnet26": dict(width_factor=0.125),
    "nf_seresnet26": dict(width_factor=0.125),
    # DeepMind's function (see the docstring).
    "dm_nfnet_f0": dict(_DM, act_layer="gelu_tanh", std_conv_eps=1e-10),
    "nf_resnet50": dict(width_factor=0.125),
}
# timm's own dm_nfnet_f0 on the tiny dm_nfnet_f0's weights.
STOCK = {"dm_nfnet_f0_stock": ("dm_nfnet_f0", _DM)}
# Every timm model the project maps (nfnets/timm_weights.py); F0's and
# eca_nfnet_l0's key lists are stored whole, the others' as digests.
MAPPED = (tuple(f"dm_nfnet_f{k}" for k in range(7)) + COUNTED +
          ("nf_resnet26", "nf_resnet50", "nf_resnet101"))
_CFG_FIELDS = ("input_size", "test_input_size", "crop_pct", "test_crop_pct",
               "crop_mode", "interpolation", "mean", "std")
NUM_CLASSES = 7
INPUT_SHAPE = (2, 37, 41, 3)  # NHWC; odd sizes: ceil-mode pools, padding


def key_shapes(name: str) -> dict[str, list[int]]:
  with torch.device("meta"):
    model = timm.create_model(name)
  return {k: list(v.shape) for k, v in model.state_dict().items()}


def digest(shapes: dict[str, list[int]]) -> str:
  """sha256 of the sorted [key, shape] list; tests/test_timm_weights.py
  computes the same from the exported key list."""
  text = json.dumps(sorted([k, list(s)] for k, s in shapes.items()))
  return hashlib.sha256(text.encode()).hexdigest()


def pretrained_cfg(name: str) -> dict:
  with torch.device("meta"):
    cfg = timm.create_model(name).pretrained_cfg
  return {f: cfg.get(f) for f in _CFG_FIELDS} | {"tag": cfg.get("tag")}


def count(name: str) -> int:
  with torch.device("meta"):
    model = timm.create_model(name)
  return sum(p.numel() for p in model.parameters())


def tiny_weights(shapes: dict[str, list[int]],
                 seed: int) -> dict[str, np.ndarray]:
  """Seeded float32 weights for timm keys; tests/timm_helpers.py has a copy."""
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in shapes.items():
    z = rng.standard_normal(shape)
    if key.endswith(".gain") or key.endswith(".skipinit_gain"):
      z = 1.0 + 0.3 * z
    elif key.endswith(".bias"):
      z = 0.3 * z
    else:
      z = z / np.sqrt(np.prod(shape[1:]))
    weights[key] = np.asarray(z, np.float32)  # 0-d too (skipinit_gain)
  return weights


def tiny_case(name: str, options: dict, seed: int, images: np.ndarray):
  """(fixture entry, logits) of one tiny timm model."""
  # DeepMind's tanh GELU, with the gamma the released code gives it.
  timm_nfnet._nonlin_gamma.setdefault(  # pylint: disable=protected-access
      "gelu_tanh", timm_nfnet._nonlin_gamma["gelu"])  # pylint: disable=protected-access
  model = timm.create_model(name, num_classes=NUM_CLASSES, **options).eval()
  shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         tiny_weights(shapes, seed).items()})
  with torch.no_grad():
    logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  entry = {"options": options, "seed": seed, "keys": shapes}
  return entry, logits.numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/data")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  fixture = {"timm_version": timm.__version__,
             "param_counts": {n: count(n) for n in COUNTED},
             "eca_nfnet_l0": key_shapes("eca_nfnet_l0"),
             "dm_nfnet_f0": key_shapes("dm_nfnet_f0"),
             "state_dict_digests": {n: digest(key_shapes(n)) for n in MAPPED},
             "pretrained_cfgs": {n: pretrained_cfg(n) for n in MAPPED},
             "tiny": {}}
  images = np.random.default_rng(100).standard_normal(INPUT_SHAPE)
  arrays = {"input": images.astype(np.float32)}
  seeds = {}
  for seed, (name, options) in enumerate(TINY.items()):
    seeds[name] = seed
    fixture["tiny"][name], arrays[name] = tiny_case(name, options, seed,
                                                    arrays["input"])
  for key, (name, options) in STOCK.items():
    _, arrays[key] = tiny_case(name, options, seeds[name], arrays["input"])
  text = json.dumps(fixture, indent=1)
  # One key a line: shapes and options on the line of their key.
  text = re.sub(r"\[[\d.,\s-]*\]",
                lambda m: json.dumps(json.loads(m.group(0))), text)
  (out / "timm_fixture.json").write_text(text + "\n")
  np.savez_compressed(out / "timm_tiny_logits.npz", **arrays)
  print(f"wrote {out}/timm_fixture.json and timm_tiny_logits.npz "
        f"(timm {timm.__version__})")


if __name__ == "__main__":
  main()
