"""NFNets as backbones: features, headless models, dilation, frozen stages.

Full-size models are traced abstractly (`jax.eval_shape`); whatever runs is
tiny. The fine-tuning config runs end to end on a generated image folder
from a released-format file of a tiny F0.
"""

import functools
import tempfile

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from configs import finetune as finetune_config
from nfnets import models
from nfnets import released_weights
from nfnets.models import common
from nfnets.training import experiment_config
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps
import jaxpr_helpers
import model_helpers
import train_helpers

# One model per family, full size.
FAMILIES = ["nfnet_f0", "nf_resnet50", "eca_nfnet_l0", "nf_seresnet50",
            "nf_regnet_b0", "resnet50", "skipinit_resnet50", "fixup_resnet50"]
# The same families, tiny (one or two blocks a stage, narrow).
TINY = {
    "nfnet_f0": dict(width_multiplier=0.125, group_width=16,
                     depths=(1, 1, 1, 1)),
    "nf_resnet26": dict(width_multiplier=0.25),
    "eca_nfnet_l0": dict(width_multiplier=0.125, group_width=8,
                         depths=(1, 1, 1, 1)),
    "nf_seresnet26": dict(width_multiplier=0.25),
    "nf_regnet_b0": dict(width_multiplier=0.5, group_width=16,
                         depths=(1, 1, 1, 1)),
    "resnet26": dict(width_multiplier=0.25),
    "skipinit_resnet26": dict(width_multiplier=0.25),
    "fixup_resnet26": dict(width_multiplier=0.25),
}
SIZE = 224


def _abstract(name, batch=2, image_size=SIZE, **overrides):
  """(params, output, features) of `name`, traced without allocating."""
  model = models.build_model(name, **overrides)

  def run(rng, images):
    params, state = model.init(rng, images, is_training=True)
    (output, features), _ = model.apply(params, state, None, images,
                                        is_training=False,
                                        return_features=True)
    return params, output, features

  return jax.eval_shape(
      run, jax.ShapeDtypeStruct((2,), jnp.uint32),
      jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32))


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_shapes_and_strides_at_output_strides_32_16_8(name):
  trees = {}
  for output_stride in (32, 16, 8):
    info = models.feature_info(name, output_stride=output_stride)
    params, output, features = _abstract(name, output_stride=output_stride)
    assert {f["name"] for f in info} == set(features)
    names = [f["name"] for f in info]
    assert names[:5] == ["stem", "stage0", "stage1", "stage2", "stage3"]
    assert names[-1] == "pre_logits"
    for f in info:
      if f["stride"] is None:  # pooled
        assert features[f["name"]].shape == (2, f["channels"])
      else:
        side = -(-SIZE // f["stride"])
        assert features[f["name"]].shape == (2, side, side, f["channels"])
    strides = [f["stride"] for f in info[:5]]
    if output_stride == 32:
      natural = strides
      assert natural[3:] == [16, 32]
    assert strides == [min(s, output_stride) for s in natural]
    assert output.shape == (2, 1000)
    trees[output_stride] = _shapes(params)
  # Dilation changes no parameter: released weights load at any stride.
  assert trees[32] == trees[16] == trees[8]


def test_f0_features_are_timm_like():
  info = models.feature_info("nfnet_f0", output_stride=16)
  assert [(f["name"], f["channels"], f["stride"]) for f in info] == [
      ("stem", 128, 4), ("stage0", 256, 4), ("stage1", 512, 8),
      ("stage2", 1536, 16), ("stage3", 1536, 16), ("final_conv", 3072, 16),
      ("pre_logits", 3072, None)]


@pytest.mark.parametrize("name", list(TINY))
def test_headless_model_has_no_classifier_params(name):
  kwargs = TINY[name]
  params, output, features = _abstract(name, num_classes=0, image_size=64,
                                       **kwargs)
  with_head, _, _ = _abstract(name, num_classes=7, image_size=64, **kwargs)
  head = {m: set(v) for m, v in with_head.items()
          if set(v) != set(params.get(m, {}))}
  root = next(iter(params)).split("/~/")[0]
  assert head in ({f"{root}/~/linear": {"w", "b"}},
                  {f"{root}/~/linear": {"w", "b"}, root: {"bias1", "bias2"}})
  assert not any(m.endswith("/~/linear") and m.count("/~/") == 1
                 for m in params)
  channels = models.feature_info(name, **kwargs)[-1]["channels"]
  assert output.shape == features["pre_logits"].shape == (2, channels)
  groups = models.parameter_groups(name, params, num_classes=0, **kwargs)
  assert "head" not in jax.tree.leaves(groups)


@pytest.mark.parametrize("name", list(TINY) + [
    "nfnet_l0", "nf_ecaresnet26", "nf_resnet26_timm"])
def test_every_family_differentiates_under_jit(name):
  # Traced, not compiled: a stage that JAX cannot linearize under jit fails
  # here (a max pool whose init value was a traced array did), as the
  # training step would.
  overrides = TINY.get(name) or TINY[
      "eca_nfnet_l0" if name == "nfnet_l0" else "nf_seresnet26"]
  model = models.build_model(name, num_classes=10, **overrides)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params, state = model_helpers.abstract_init(name, num_classes=10,
                                              **overrides)

  def loss(params, state, x):
    logits, _ = model.apply(params, state, jax.random.PRNGKey(1), x,
                            is_training=True)
    return jnp.mean(logits)

  grads = jax.eval_shape(jax.jit(jax.grad(loss)), params, state, images)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("name", list(TINY))
def test_every_parameter_has_a_group(name):
  params, _, _ = _abstract(name, num_classes=5, image_size=64, **TINY[name])
  groups = models.parameter_groups(name, params, num_classes=5, **TINY[name])
  found = set(jax.tree.leaves(groups))
  expected = {"stem", "stage0", "stage1", "stage2", "stage3", "head"}
  final = {"final"} if name in ("nfnet_f0", "eca_nfnet_l0", "nf_regnet_b0",
                                "resnet26") else set()
  assert found == expected | final
  if name == "fixup_resnet26":
    assert groups["FixUp_ResNet"] == {"bias1": "stem", "bias2": "head"}


def test_f0_blocks_map_to_their_stages():
  model = models.build_model("nfnet_f0")
  params, _ = jax.eval_shape(
      functools.partial(model.init, is_training=True),
      jax.ShapeDtypeStruct((2,), jnp.uint32),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  groups = models.parameter_groups("nfnet_f0", params)
  blocks = {}
  for module, leaves in groups.items():
    parts = module.split("/~/")
    if parts[1].startswith("nf_block"):
      blocks.setdefault(leaves[next(iter(leaves))], set()).add(parts[1])
  assert {g: len(b) for g, b in blocks.items()} == {
      "stage0": 1, "stage1": 2, "stage2": 6, "stage3": 3}
  assert groups["NFNet/~/nf_block_3/~/squeeze_excite/~/linear"] == {
      "w": "stage2", "b": "stage2"}
  assert groups["NFNet/~/stem_conv0"]["w"] == "stem"
  assert groups["NFNet/~/final_conv"]["w"] == "final"
  assert groups["NFNet/~/linear"]["w"] == "head"


@pytest.mark.parametrize("output_stride", [2, 12, 64])
def test_bad_output_stride_is_a_clear_error(output_stride):
  with pytest.raises(ValueError, match=(
      "output_stride must be one of 4, 8, 16, 32 .*the stem's 4 cannot be "
      f"dilated.*got {output_stride}")):
    models.feature_info("nfnet_f0", output_stride=output_stride)


@pytest.mark.parametrize("rate,groups", [(2, 1), (2, 4), (4, 2)])
def test_dilated_is_the_dilated_convolution(rate, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 13, 10, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 8 // groups, 12)),
                       jnp.float32)
  conv = lambda y, r: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      y, kernel, (1, 1), "SAME", rhs_dilation=(r, r),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  np.testing.assert_allclose(
      common.dilated(lambda y: conv(y, 1), x, rate), conv(x, rate),
      rtol=1e-5, atol=1e-5)


def test_dilated_model_keeps_the_early_features():
  """At output stride 8 the stages before the dilation compute as before."""
  kwargs = TINY["nfnet_f0"]
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  params = _random_params("nfnet_f0", num_classes=10, **kwargs)
  models_at = {s: models.build_model("nfnet_f0", num_classes=10,
                                     output_stride=s, **kwargs)
               for s in (32, 8)}

  @model_helpers.fast_jit
  def run(params, images):
    return {s: m.apply(params, {}, None, images, is_training=False,
                       return_metrics=True, return_features=True)[0]
            for s, m in models_at.items()}

  out = run(params, images)
  logits, metrics, features = out[8]
  assert set(metrics) == {"avg_sq_mean", "avg_var", "res_var", "stage"}
  assert np.isfinite(np.asarray(logits)).all()
  for key in ("stem", "stage0", "stage1"):
    np.testing.assert_allclose(features[key], out[32][2][key], rtol=1e-5,
                               atol=1e-5)
  assert features["stage3"].shape[1:3] == (8, 8)


# ---------------------------------------------------------------- freezing


def _tiny_f0_config(**optimizer):
  c = experiment_config.base_config()
  c.model = experiment_config.model_config("nfnet_f0", **TINY["nfnet_f0"])
  c.dataset.num_classes = 10
  c.optimizer.update(dict(agc_clipping=0.01, weight_decay=0.1, **optimizer))
  return c


def _random_params(name, **overrides):
  """Random params of a model, made without compiling: N(1, 1) each."""
  params, _, _ = _abstract(name, image_size=32, **overrides)
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: np.asarray(rng.standard_normal(s.shape) + 1.0, np.float32),
      params)


@functools.cache
def _tiny_f0_random_params():
  return _random_params("nfnet_f0", num_classes=10, **TINY["nfnet_f0"])


def _tiny_f0_params():
  # device_put, not jnp.asarray: that compiles a (staging) program per shape.
  return jax.device_put(_tiny_f0_random_params())


def _frozen(config, params):
  return jax.tree.map(lambda label: label == optim.FROZEN,
                      optim.freeze_labels(config, params))


def _moved(updates):
  # On the host: eager jnp operations would compile a program per shape.
  return jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)


# SGD's weight decay is a chain element, AdamW's (as LAMB's) inside optax's
# own transformation: both paths.
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_frozen_stages_get_no_update_decay_or_agc(name):
  config = _tiny_f0_config(name=name, freeze_stages=1)
  params = _tiny_f0_params()
  frozen = _frozen(config, params)
  groups = models.parameter_groups("nfnet_f0", params, num_classes=10,
                                   **TINY["nfnet_f0"])
  assert jax.tree.leaves(frozen) == [
      g in ("stem", "stage0") for g in jax.tree.leaves(groups)]
  optimizer = optim.make_optimizer(config, lambda _: 0.1)
  # Jitted, with cheaper XLA:CPU settings (and the gradients below made on
  # the host): eager operations would compile a program per shape.
  state = model_helpers.fast_jit(optimizer.init)(params)
  update = model_helpers.fast_jit(optimizer.update)
  # No optimizer state (momentum, Adam moments) for what is frozen.
  unfrozen = jax.eval_shape(optim.make_optimizer(
      _tiny_f0_config(name=name), lambda _: 0.1).init, params)
  assert len(jax.tree.leaves(state)) < len(jax.tree.leaves(unfrozen))
  # Huge gradients: every trained unit is clipped, no frozen one moves.
  huge = jax.tree.map(lambda p: np.full(p.shape, 1e3, np.float32), params)
  updates, new_state = update(huge, state, params)
  assert _moved(updates) == jax.tree.map(lambda f: not f, frozen)
  assert float(optim.agc_clipped_fraction(new_state)) == 1.0
  # Huge gradients on the frozen parameters only: AGC does not count them.
  only_frozen = jax.tree.map(lambda g, f: g if f else np.zeros_like(g),
                             huge, frozen)
  updates, new_state = update(only_frozen, state, params)
  assert float(optim.agc_clipped_fraction(new_state)) == 0.0
  # Zero gradients: weight decay moves the trained kernels, not the frozen.
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
  updates, _ = update(zeros, state, params)
  decayed = optim.weight_decay_mask(params)
  assert _moved(updates) == jax.tree.map(
      lambda d, f: d and not f, decayed, frozen)


def test_linear_probe_updates_only_the_head():
  config = _tiny_f0_config(linear_probe=True)
  params = _tiny_f0_params()
  optimizer = optim.make_optimizer(config, lambda _: 0.1)
  grads = jax.tree.map(lambda p: np.ones(p.shape, np.float32), params)
  # One jitted program: eager operations would compile one per shape.
  updates = model_helpers.fast_jit(
      lambda g, p: optimizer.update(g, optimizer.init(p), p)[0])(grads, params)
  moved = {m for m, leaves in _moved(updates).items() if any(leaves.values())}
  assert moved == {"NFNet/~/linear"}


@functools.cache
def _step_convolutions(**optimizer_options):
  """(forward convolutions, convolutions in the train step's jaxpr) of
  `train_helpers.tiny_config` with these optimizer options on one device.

  Traced, not compiled: the state is the init's shapes (`jax.eval_shape`).
  """
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
  config = train_helpers.tiny_config(**{
      f"optimizer.{k}": v for k, v in optimizer_options.items()})
  model = models.build_model(config.model.name, num_classes=10,
                             **config.model.kwargs)
  schedule = optim.learning_rate_schedule(config, 100, 10)
  optimizer = optim.make_optimizer(config, schedule)
  state = jax.eval_shape(steps.make_init(model, optimizer, (32, 32, 3), mesh),
                         jax.random.PRNGKey(0))
  step = steps.make_train_step(model, optimizer, schedule, config, mesh)
  count = jaxpr_helpers.count_primitive(
      step, "conv_general_dilated", state,
      parallel.shard_batch(train_helpers.batch(8), mesh))
  # One forward convolution per conv module.
  return sum(1 for m in state.params if "conv" in m or "stem" in m), count


@pytest.mark.parametrize("freeze", [dict(freeze_stages=1),
                                    dict(linear_probe=True)])
def test_the_step_computes_no_gradient_for_frozen_stages(freeze):
  # The train step's convolutions: frozen parameters are stop_gradient'ed in
  # the loss, so the backward pass has no weight gradient for a frozen conv
  # and stops before the first trained one. (The unfrozen step's count is
  # traced once for both cases.)
  forward, unfrozen = _step_convolutions()
  _, frozen = _step_convolutions(**freeze)
  if freeze.get("linear_probe"):
    assert frozen == forward  # no backward conv at all
  else:
    assert forward < frozen < unfrozen


@pytest.mark.parametrize("change,match", [
    (dict(freeze_stages=5), r"freeze_stages must be in \[-1, 4\]"),
    (dict(freeze_stages=-2), r"freeze_stages must be in \[-1, 4\]"),
    (dict(freeze_stages=0, linear_probe=True), "leave optimizer.freeze_st"),
])
def test_bad_freeze_options_are_clear_errors(change, match):
  config = _tiny_f0_config(**change)
  with pytest.raises(ValueError, match=match):
    experiment_config.validate(config)


# ------------------------------------------------------- the example config


def test_finetune_config_needs_the_number_of_classes(tmp_path):
  config = finetune_config.get_config()
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="dataset.num_classes must be "
                     "positive .*number of class folders"):
    experiment_config.validate(config)


def test_finetune_config_runs_end_to_end(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow")
  from nfnets.training import weights_io  # pylint: disable=g-import-not-at-top
  from nfnets.training import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  config = finetune_config.get_config("smoke=True")
  assert config.dataset.data_dir.startswith(str(tmp_path))
  name, kwargs = config.model.name, config.model.kwargs.to_dict()
  # A released-format file of the tiny F0 (a 1000-class head).
  params = _random_params(name, num_classes=1000, **kwargs)
  released = str(tmp_path / "F0_tiny_haiku.npz")
  released_weights.save_released(params, released)
  config.init_from = released
  # The stem and stages 0-2 frozen: equal to the file after training, they
  # show it was loaded (the released-format path, with a head of another
  # width dropped); stage 3, the final conv and the new head train.
  config.optimizer.freeze_stages = 3
  config.fast_paths = False  # the plain twins compile faster on CPUs
  config.checkpoint.async_save = False
  config.num_steps = 3
  results = loop.train_and_evaluate(config, str(tmp_path / "run"), "train")
  assert np.isfinite(results["loss"])
  assert results["eval_examples"] == 3 * 2  # a quarter of 8 per class
  saved = weights_io.read_params(str(tmp_path / "run"))["params"]
  assert saved["NFNet/~/linear"]["w"].shape == (
      models.feature_info(name, **kwargs)[-1]["channels"], 3)
  groups = models.parameter_groups(name, saved, num_classes=3, **kwargs)
  moved = {}
  for module, leaves in saved.items():
    if module == "NFNet/~/linear":
      continue
    for leaf, value in leaves.items():
      group = groups[module][leaf]
      same = np.array_equal(value, np.asarray(params[module][leaf]))
      if group in ("stem", "stage0", "stage1", "stage2"):
        assert same, f"frozen {module}/{leaf} changed"
      moved[group] = moved.get(group, False) or not same
  assert moved == {"stem": False, "stage0": False, "stage1": False,
                   "stage2": False, "stage3": True, "final": True}
  assert np.any(saved["NFNet/~/linear"]["w"] != 0)
