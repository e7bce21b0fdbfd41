"""NFNets as backbones: features, headless models, dilation.

Full-size models are traced abstractly (`jax.eval_shape`); whatever runs is
tiny. Frozen stages and the fine-tuning config: test_finetune.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import models
from nfnets.models import common
import model_helpers

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
  params = model_helpers.random_params("nfnet_f0", num_classes=10, **kwargs)
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
