"""SkipInit and Fixup ResNets (the ICLR 2021 paper's unnormalized baselines).

Checked against the released code (google-deepmind/deepmind-research,
`nfnets/skipinit_resnet.py`, `nfnets/fixup_resnet.py`) through what it
builds: the parameter tree of its ResNet-50s, written out below from its
structure; each block against a direct transcription of its `__call__` in
plain `jax.lax`/`jnp`; Fixup's init stds against the formula; and what the
paper says of both at init: every residual block is the identity, so the
signal's variance stays flat within a stage (an NF-ResNet's, in the paper's
SPPs drawn with skip_gain 1, grows as `1 + j * alpha^2`).
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from nfnets import models
from nfnets.models import resnet_baselines
from nfnets.training import experiment_config
from nfnets.training import parallel

from model_helpers import fast_jit  # pylint: disable=g-bad-import-order
from train_helpers import batch  # pylint: disable=g-bad-import-order
from train_helpers import setup  # pylint: disable=g-bad-import-order
import configs.resnet as resnet_config  # pylint: disable=g-bad-import-order

FAMILIES = ("skipinit", "fixup")
TOP = {"skipinit": "SkipInit_ResNet", "fixup": "FixUp_ResNet"}
SMALL = dict(width_multiplier=0.25, num_classes=10)  # stages 64 ... 512
FIXUP_SCALARS = ("bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "bias3b",
                 "scale")


def _released_resnet50_tree(family):
  """{module: {name: shape}} that the released ResNet50 classes create.

  Stem: 7x7 conv to 64 without bias (Fixup: scalars bias1, bias2 on the
  network). Blocks (3, 4, 6, 3) of widths 256 ... 2048 with a quarter-width
  bottleneck, the first of each stage with a 1x1 projection; SkipInit's
  `NFResBlock` has biased convs and `skip_gain`, Fixup's `ResBlock` unbiased
  convs and seven scalars. Head: `linear` 2048 -> 1000 with bias.
  """
  top = TOP[family]
  skipinit = family == "skipinit"
  block_name = "nf_res_block" if skipinit else "res_block"
  tree = {f"{top}/~/initial_conv": {"w": (7, 7, 3, 64)},
          f"{top}/~/linear": {"w": (2048, 1000), "b": (1000,)}}
  if not skipinit:
    tree[top] = {"bias1": (), "bias2": ()}

  def conv(path, k, cin, cout):
    tree[path] = {"w": (k, k, cin, cout)}
    if skipinit:
      tree[path]["b"] = (cout,)

  in_ch, index = 64, 0
  for width, count in zip((256, 512, 1024, 2048), (3, 4, 6, 3)):
    for j in range(count):
      block = f"{top}/~/{block_name}" + (f"_{index}" if index else "")
      tree[block] = ({"skip_gain": ()} if skipinit else
                     {n: () for n in FIXUP_SCALARS})
      conv(f"{block}/~/conv0", 1, in_ch, width // 4)
      conv(f"{block}/~/conv1", 3, width // 4, width // 4)
      conv(f"{block}/~/conv2", 1, width // 4, width)
      if j == 0:
        conv(f"{block}/~/conv_shortcut", 1, in_ch, width)
      in_ch, index = width, index + 1
  return tree


@pytest.mark.parametrize("family,count", [("skipinit", 25_530_424),
                                          ("fixup", 25_504_026)])
def test_resnet50_tree_and_count_are_the_released_code_s(family, count):
  model = models.build_model(f"{family}_resnet50")
  params, state = jax.eval_shape(
      lambda r, x: model.init(r, x, is_training=True),
      jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                  jnp.float32))
  assert not state
  shapes = {m: {n: tuple(v.shape) for n, v in leaves.items()}
            for m, leaves in params.items()}
  expected = _released_resnet50_tree(family)
  assert shapes == expected
  assert sum(math.prod(s) for m in expected.values()
             for s in m.values()) == count


def _init_small(family):
  model = models.build_model(f"{family}_resnet26", **SMALL)
  images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
  params, _ = fast_jit(lambda r, x: model.init(r, x, is_training=True))(
      jax.random.PRNGKey(0), images)
  return model, params, images


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_is_the_identity_at_init(family):
  """Signal propagation at init (ICLR 2021, Sec. 3; SkipInit, Fixup)."""
  model, params, images = _init_small(family)
  apply = fast_jit(lambda p, x: model.apply(p, {}, None, x, is_training=False,
                                            return_metrics=True)[0])
  logits, metrics = apply(params, images)
  # Zero classifier: every logit starts at 0.
  np.testing.assert_array_equal(logits, 0.0)
  stages = np.asarray(metrics["stage"])
  np.testing.assert_array_equal(stages, [0, 0, 1, 1, 2, 2, 3, 3])
  variance = np.asarray(metrics["avg_var"])
  res_var = np.asarray(metrics["res_var"])
  assert np.all(variance > 0)
  # The second block of each stage returns its input: the variance is flat
  # within a stage.
  np.testing.assert_allclose(variance[1::2], variance[::2], rtol=1e-6)
  if family == "fixup":
    # The branch itself is zero (its last conv is), not only gated.
    np.testing.assert_array_equal(res_var, 0.0)
    changed = hk.data_structures.map(
        lambda m, n, v: jnp.full_like(v, 0.01) if n == "w" and
        m.endswith("conv2") else v, params)
  else:
    assert np.all(res_var > 0)  # a live branch behind a zero gain
    changed = hk.data_structures.map(
        lambda m, n, v: jnp.ones_like(v) if n == "skip_gain" else v, params)
  # Not the identity once the branch can contribute.
  _, metrics = apply(changed, images)
  assert not np.allclose(metrics["avg_var"][1::2], metrics["avg_var"][::2],
                         rtol=1e-3)


def test_fixup_rescales_the_branch_convs_init():
  """Zhang et al. 2019, Sec. 3: He init times `L^{-1/(2m-2)}`, m = 3, as the
  released code computes the He std (from the conv's outputs)."""
  assert resnet_baselines.fixup_rescale(16) == 0.5  # ResNet-50: L = 16
  _, params, _ = _init_small("fixup")
  rescale = 8 ** -0.25  # ResNet-26: L = 8
  top = TOP["fixup"]
  samples = {"conv0": [], "conv1": [], "conv2": [], "conv_shortcut": []}
  expected_std = {}
  for module, leaves in params.items():
    kind = module.split("/")[-1]
    if module.startswith(f"{top}/~/res_block") and kind in samples:
      w = np.asarray(leaves["w"])
      # Normalised by the formula, so that all blocks pool into one sample.
      out_ch, k = w.shape[-1], w.shape[0]
      std = {"conv0": (2 / out_ch) ** 0.5 * rescale,
             "conv1": (2 / (out_ch * k * k)) ** 0.5 * rescale,
             "conv2": 1.0,
             "conv_shortcut": (2 / out_ch) ** 0.5}[kind]
      samples[kind].append(w.ravel() / std)
      expected_std[kind] = 0.0 if kind == "conv2" else 1.0
    elif module.startswith(f"{top}/~/res_block"):
      assert set(leaves) == set(FIXUP_SCALARS)
      for name, value in leaves.items():
        assert float(value) == (1.0 if name == "scale" else 0.0)
  for kind, parts in samples.items():
    pooled = np.concatenate(parts)
    assert pooled.size > 10_000
    # Normal (not truncated) draws: unit std after the division, to 3%.
    assert np.std(pooled) == pytest.approx(expected_std[kind], abs=0.03)
  assert float(params[top]["bias1"]) == float(params[top]["bias2"]) == 0.0
  np.testing.assert_array_equal(params[f"{top}/~/linear"]["w"], 0.0)


def test_skipinit_convs_keep_haiku_s_default_init():
  """Truncated normal (2 std) of std 1/sqrt(fan_in), biases 0, gains 0."""
  _, params, _ = _init_small("skipinit")
  pooled = []
  for module, leaves in params.items():
    if "/~/conv" in module:
      w = np.asarray(leaves["w"])
      pooled.append(w.ravel() * math.sqrt(math.prod(w.shape[:-1])))
      np.testing.assert_array_equal(leaves["b"], 0.0)
    elif "nf_res_block" in module:
      assert set(leaves) == {"skip_gain"} and float(leaves["skip_gain"]) == 0
  pooled = np.concatenate(pooled)
  assert np.abs(pooled).max() <= 2.0
  assert np.std(pooled) == pytest.approx(0.8796, abs=0.03)


# The blocks, transcribed from the released `__call__`s with plain ops.
_DROP_RATE = 0.5


def _conv(p, x, stride=1):
  """SAME conv, as TF pads: for stride 2 on even sizes, one row after."""
  k = p["w"].shape[0]
  if k == 1:
    out = jnp.einsum("nhwc,cd->nhwd", x[:, ::stride, ::stride], p["w"][0, 0])
  else:
    pad = (1, 1) if stride == 1 else (0, 1)
    out = jax.lax.conv_general_dilated(
        x, p["w"], (stride, stride), (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
  return out + p["b"] if "b" in p else out


def _skipinit_reference(p, x, stride, keep):
  relu = jax.nn.relu
  out = relu(x)
  shortcut = _conv(p["conv_shortcut"], out, stride) if "conv_shortcut" in p \
      else x
  h = _conv(p["conv0"], out)
  h = _conv(p["conv1"], relu(h), stride)
  h = _conv(p["conv2"], relu(h))
  return h * keep * p["block"]["skip_gain"] + shortcut


def _fixup_reference(p, x, stride, keep):
  relu, s = jax.nn.relu, p["block"]
  out = x + s["bias1a"]
  shortcut = _conv(p["conv_shortcut"], out, stride) if "conv_shortcut" in p \
      else out
  h = relu(_conv(p["conv0"], out) + s["bias1b"])
  h = relu(_conv(p["conv1"], h + s["bias2a"], stride) + s["bias2b"])
  h = _conv(p["conv2"], h + s["bias3a"]) * s["scale"] + s["bias3b"]
  return relu(h * keep + shortcut)


@pytest.mark.parametrize("family,in_ch,out_ch,stride", [
    ("skipinit", 16, 16, 1), ("skipinit", 8, 16, 2),
    ("fixup", 16, 16, 1), ("fixup", 8, 16, 2)])
def test_block_matches_the_released_code_s_formula(family, in_ch, out_ch,
                                                   stride):
  block, reference = {
      "skipinit": (resnet_baselines.SkipInitBlock, _skipinit_reference),
      "fixup": (resnet_baselines.FixupBlock, _fixup_reference)}[family]
  options = dict(num_blocks=16) if family == "fixup" else {}
  f = hk.transform(lambda x: block(
      in_ch, out_ch, stride=stride, activation=jax.nn.relu,
      drop_rate=_DROP_RATE, name="block", **options)(x, is_training=True)[0])
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, in_ch))
  params = f.init(jax.random.PRNGKey(1), x)
  # Every parameter off its init (non-zero gains, biases, last conv).
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [
      leaf + 0.3 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])
  rng = jax.random.PRNGKey(3)
  # The block's only random draw: the stochastic-depth mask.
  mask_key = hk.transform(hk.next_rng_key).apply({}, rng)
  keep = jax.random.bernoulli(mask_key, 1 - _DROP_RATE,
                              (8, 1, 1, 1)).astype(jnp.float32)
  assert 0 < float(keep.sum()) < 8  # Both cases occur.
  by_layer = {k.split("/")[-1]: v for k, v in params.items()}
  with jax.default_matmul_precision("highest"):
    got = fast_jit(f.apply)(params, rng, x)
    want = fast_jit(lambda p, v, k: reference(p, v, stride, k))(
        by_layer, x, keep)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_stays_bfloat16(family):
  """The float32 scalar parameters must not promote the activations."""
  model = models.build_model(f"{family}_resnet26", **SMALL)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.bfloat16)
  params, _ = jax.eval_shape(lambda r, x: model.init(r, x, is_training=True),
                             jax.random.PRNGKey(0), images)
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16),
                        params)
  (logits, metrics), _ = jax.eval_shape(
      lambda p, x: model.apply(p, {}, jax.random.PRNGKey(0), x,
                               is_training=True, return_metrics=True),
      params, images)
  assert logits.dtype == jnp.bfloat16
  assert metrics["avg_var"].shape == (8,)


def test_config_kind_picks_the_model():
  for kind, name in [("bn", "resnet101"), ("skipinit", "skipinit_resnet101"),
                     ("fixup", "fixup_resnet101")]:
    c = resnet_config.get_config(f"kind={kind},depth=101")
    assert c.model.name == name
    assert c.model.kwargs.dropout_rate == c.model.kwargs.drop_path_rate == 0
  assert resnet_config.get_config().model.name == "resnet50"
  with pytest.raises(ValueError, match="kind=lrn; valid: bn, skipinit, fixup"):
    resnet_config.get_config("kind=lrn")
  for kind in FAMILIES:
    c = resnet_config.get_config(f"kind={kind},depth=26,smoke=True")
    experiment_config.validate(c)
    # Fixup's smoke model is twice as wide, SkipInit's digits are shifted
    # (configs/resnet.py).
    assert c.model.kwargs.width_multiplier == (0.5 if kind == "fixup" else
                                               0.25)
    assert c.dataset.augment_shift == (2 if kind == "skipinit" else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_train_step_runs_with_a_finite_loss(family):
  config = resnet_config.get_config(f"kind={family},depth=26,smoke=True")
  # Stochastic depth and dropout on, and the zero classifier, as the models'
  # defaults (the smoke config draws the classifier from N(0, 0.01^2)).
  config.model.kwargs.update(dict(drop_path_rate=0.1, dropout_rate=0.25,
                                  fc_init_std=0.0))
  config.optimizer.warmup_epochs = 0.0  # a non-zero first step
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
  state, step = setup(config, mesh)
  before = jax.device_get(state.params)
  state, metrics = step(state, parallel.shard_batch(batch(), mesh))
  loss = float(metrics["loss"])
  # A zero classifier starts at the uniform prediction: loss ln(10).
  assert np.isfinite(loss) and loss == pytest.approx(math.log(10), rel=1e-3)
  after = jax.device_get(state.params)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(before),
                                               jax.tree.leaves(after))]
  assert max(moved) > 0
