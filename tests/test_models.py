"""Tests of the model zoo against the papers and the released checkpoints.

Sizes and GMACs, the released checkpoints' parameter layout, errors on bad
input, and the registry (numerics are in test_model_numerics.py). Full-size
models are only traced abstractly (`jax.eval_shape`, `summary.summarize`);
anything that runs uses small widths (`model_helpers`).
"""

import csv
import functools
import json
import pathlib
import re

import haiku as hk
import jax
import jax.numpy as jnp
import pytest

from model_helpers import NFNET_SMALL
from nfnets import models
from nfnets.models import nf_resnet
from nfnets.models import summary

TSV_NAME = "deepmind_nfnet_f0_params.tsv"
# The in-repo copy is what the tests read: CI's ../shared may be absent.
TSV_COPY = pathlib.Path(__file__).resolve().parent / "data" / TSV_NAME
SHARED_TSV = (pathlib.Path(__file__).resolve().parents[2] / "shared" /
              "formats" / TSV_NAME)

# (params, GMACs at the test resolution) of F0-F7 as the released code
# defines them (google-deepmind/deepmind-research `nfnets/base.py`,
# `nfnet_params`); the NFNet paper (ICML 2021) reports the same sizes
# rounded (F0: 71.5M parameters, 12.38 GFLOPs).
NFNET_SIZES = {
    "nfnet_f0": (71_489_284, 12.38),
    "nfnet_f1": (132_634_256, 35.54),
    "nfnet_f2": (193_779_228, 62.59),
    "nfnet_f3": (254_924_200, 114.76),
    "nfnet_f4": (316_069_172, 215.24),
    "nfnet_f5": (377_214_144, 289.76),
    "nfnet_f6": (438_359_116, 377.28),
    "nfnet_f7": (499_504_088, 478.78),
}
RESNET_DEPTHS = (26, 50, 101, 152, 200, 288, 600)


# ------------------------------------------------------------------ helpers


def _abstract_init(name, image_size=64, **overrides):
  """(params, state) as ShapeDtypeStructs, traced without allocating."""
  model = models.build_model(name, **overrides)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, is_training=True), rng,
                        images)


def _shapes(params):
  return {(module, name): tuple(v.shape)
          for module, name, v in hk.data_structures.traverse(params)}


def _block_of(module_path):
  match = re.match(r"NFNet/~/(nf_block(?:_\d+)?)(?:/|$)", module_path)
  return match.group(1) if match else None


def _block_name(index):
  return "nf_block" if index == 0 else f"nf_block_{index}"


def _read_tsv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f, delimiter="\t"))
  assert rows[0] == ["module", "parameter", "shape"]
  return {(module, name): tuple(json.loads(shape))
          for module, name, shape in rows[1:]}


# ------------------------------------------------------- sizes and GMACs


@pytest.mark.parametrize("name", sorted(NFNET_SIZES))
def test_nfnet_params_and_gmacs_match_spec(name):
  params, gmacs = NFNET_SIZES[name]
  info = summary.summarize(name)
  assert info["params"] == params
  assert info["gmacs"] == pytest.approx(gmacs, rel=0.01)
  assert info["image_size"] == models.image_sizes(name)[1]


def test_nfnet_f0_gmacs_at_train_resolution():
  info = summary.summarize("nfnet_f0", image_size=192)
  assert info["gmacs"] == pytest.approx(6.98, rel=0.01)


@pytest.mark.parametrize("name,expected", [
    ("nf_resnet50", 25_557_048),  # README; ~25.5M like torchvision's.
    ("resnet50", 25_549_352),
])
def test_resnet50_param_counts(name, expected):
  params, _ = _abstract_init(name)
  assert summary.count_params(params) == expected


# ------------------------------------------ released checkpoint layout


def test_in_repo_tsv_copy_matches_shared():
  if not SHARED_TSV.exists():
    pytest.skip("../shared is not beside the repository")
  assert TSV_COPY.read_text() == SHARED_TSV.read_text()


def test_nfnet_f0_tree_matches_deepmind_checkpoint():
  expected = _read_tsv(TSV_COPY)
  params, _ = _abstract_init("nfnet_f0", image_size=32)
  actual = _shapes(params)
  assert sorted(set(actual) - set(expected)) == []
  assert sorted(set(expected) - set(actual)) == []
  assert actual == expected
  assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype("float32")}


def test_nfnet_f1_tree_continues_the_numbering():
  f0 = _read_tsv(TSV_COPY)
  params, _ = _abstract_init("nfnet_f1", image_size=32)
  f1 = _shapes(params)
  blocks = {_block_of(m) for m, _ in f1} - {None}
  assert blocks == {_block_name(i) for i in range(24)}
  # Depths (2, 4, 12, 6): only the first block of each stage has a
  # projection shortcut, as F0's first blocks (0, 1, 3, 9) do.
  with_shortcut = {_block_of(m) for m, _ in f1 if m.endswith("conv_shortcut")}
  assert with_shortcut == {_block_name(i) for i in (0, 2, 6, 18)}
  f0_shortcut = {_block_of(m) for m, _ in f0 if m.endswith("conv_shortcut")}
  assert f0_shortcut == {_block_name(i) for i in (0, 1, 3, 9)}
  # Outside the blocks (stem, final conv, classifier) F1 is F0.
  assert ({k: v for k, v in f1.items() if _block_of(k[0]) is None} ==
          {k: v for k, v in f0.items() if _block_of(k[0]) is None})


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize("name,overrides,image_size,match", [
    ("nfnet_f0", dict(activation="mish"), 64, "unknown activation 'mish'"),
    ("nf_resnet26", dict(activation="mish"), 64, "unknown activation 'mish'"),
    ("nfnet_f0", {}, 16, "16x16 is smaller than the network's total stride"),
    ("nf_resnet26", {}, 16, "smaller than the network's total stride"),
    ("nfnet_f0", dict(width_multiplier=0.25), 64,
     "narrower than the group width 128"),
    ("nfnet_f0", dict(variant="F9"), 64, "unknown NFNet variant 'F9'"),
    ("nfnet_f0", dict(depths=(1, 2)), 64, "depths must be 4"),
    ("nfnet_f0", dict(colour="red"), 64,
     "unknown option 'colour' for model 'nfnet_f0'"),
])
def test_bad_model_options_raise_clear_errors(name, overrides, image_size,
                                              match):
  with pytest.raises(ValueError, match=match):
    _abstract_init(name, image_size=image_size, **overrides)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match="unknown model 'nfnet_f9'") as info:
    models.build_model("nfnet_f9")
  assert all(n in str(info.value) for n in ("nfnet_f0", "resnet50",
                                            "nf_resnet26_nows"))


def test_unknown_variant_through_create_model():
  forward = hk.transform(lambda x: models.create_model(
      "nfnet_f1", variant="F1++x")(x, is_training=False))
  with pytest.raises(ValueError, match="unknown NFNet variant 'F1\\+\\+x'"):
    jax.eval_shape(forward.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_bad_resnet_depth():
  forward = hk.transform(
      lambda: nf_resnet.NFResNet(depth=34)(jnp.zeros((1, 32, 32, 3)), False))
  with pytest.raises(ValueError, match="unknown ResNet depth 34; valid: 26"):
    forward.init(None)


# -------------------------------------------------------------- registry


def test_registry_names():
  base = {f"nfnet_f{k}{plus}" for k in range(8) for plus in ("", "plus")}
  base |= {f"{kind}resnet{d}" for kind in ("nf_", "", "skipinit_", "fixup_")
           for d in RESNET_DEPTHS}
  base |= {f"nf_regnet_b{k}" for k in range(9)}
  base |= {"nfnet_l0"} | {f"eca_nfnet_l{k}" for k in range(4)}
  base |= {f"nf_{kind}resnet{d}" for kind in ("se", "eca")
           for d in (26, 50, 101)}
  base |= {f"nf_resnet{d}_timm" for d in (26, 50, 101)}
  nf = {n for n in base if n.startswith(("nf", "eca_nfnet"))}
  assert set(models.MODELS) == base | {f"{n}_nows" for n in nf}


# The class each registered family builds, and its blocks for a name.
def _expected_model(name):
  base = name.removesuffix("_nows")
  if base.startswith("nfnet_f"):
    return "NFNet", 12 * (int(base[len("nfnet_f")]) + 1)
  if base.startswith("nf_regnet_b"):
    return "NFRegNet", None
  if base.startswith(("nfnet_l", "eca_nfnet_l")):
    return "NFNetLight", {"0": 12, "1": 24, "2": 36, "3": 48}[base[-1]]
  depth = int(re.search(r"resnet(\d+)", base).group(1))
  # 288 is the paper's (24, 24, 24, 24), 600 the released code's
  # (50, 50, 50, 50).
  blocks = None if depth in (288, 600) else (depth - 2) // 3
  if base.startswith(("nf_se", "nf_eca")) or base.endswith("_timm"):
    return "NFResNetTimm", blocks
  kind = {"nf": "NFResNet", "skipinit": "SkipInitResNet",
          "fixup": "FixupResNet"}.get(base.split("_")[0], "ResNet")
  return kind, blocks


def test_every_registered_model_constructs():
  def construct():
    return {n: models.create_model(n) for n in models.MODELS}

  for name, model in hk.transform(construct).apply({}, None).items():
    kind, blocks = _expected_model(name)
    assert type(model).__name__ == kind, name
    if blocks is not None:
      assert len(model.blocks) == blocks, name
    if name.endswith("_nows"):
      first = model.blocks[0]
      conv = getattr(first, "conv0", None) or first.conv1
      assert not conv.standardize, name


@pytest.mark.parametrize("name,overrides", [
    ("nfnet_f0plus_nows", dict(NFNET_SMALL, num_classes=7)),
    ("nfnet_f2", dict(NFNET_SMALL, num_classes=7, activation="relu")),
    ("nf_resnet101", dict(width_multiplier=0.125, num_classes=7)),
    ("resnet26", dict(width_multiplier=0.125, num_classes=7)),
])
def test_small_configs_build_and_classify(name, overrides):
  model = models.build_model(name, **overrides)
  params, state = _abstract_init(name, **overrides)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  (logits, metrics), _ = jax.eval_shape(
      lambda p, s, x: model.apply(p, s, None, x, is_training=False,
                                  return_metrics=True), params, state, images)
  assert logits.shape == (2, 7)
  assert metrics["avg_var"].shape == metrics["stage"].shape


@pytest.mark.parametrize("name,sizes", [
    ("nfnet_f3plus", (320, 416)),
    ("nfnet_f0", (192, 256)),
    ("nfnet_f7_nows", (480, 608)),
    ("nf_resnet50", (224, 224)),
    # timm-structured models: timm's pretrained_cfg.
    ("nf_resnet50_timm", (256, 288)),
    ("nf_seresnet26", (224, 224)),
    ("eca_nfnet_l1_nows", (256, 320)),
])
def test_image_sizes(name, sizes):
  assert models.image_sizes(name) == sizes


def test_image_sizes_of_unknown_model():
  with pytest.raises(ValueError, match="unknown model 'resnet34'"):
    models.image_sizes("resnet34")


def test_image_sizes_rejects_unregistered_nfnet_names():
  with pytest.raises(ValueError, match="unknown model"):
    models.image_sizes("nfnet_f0_typo")


def test_unknown_nfnet_name_in_summary_says_unknown_model():
  with pytest.raises(ValueError, match="unknown model 'nfnet_f9'"):
    summary.summarize("nfnet_f9")
