"""timm's light NFNets (`nfnets.models.nfnet_light`) against timm itself.

timm is not a test dependency: scripts/timm_fixture.py ran timm 1.0.31 once
and wrote what these tests compare with into tests/data (parameter counts,
eca_nfnet_l0's state-dict keys and shapes, tiny models' logits).
"""

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nfnet_light as light_config
from nfnets import layers
from nfnets import models
from nfnets.models import nfnet_light
from nfnets.training import experiment_config
import model_helpers
import timm_helpers

# sum(p.numel() for p in timm.create_model(name).parameters()), timm 1.0.31,
# on meta-device models (scripts/timm_fixture.py; also in the fixture).
TIMM_PARAMS = {
    "nfnet_l0": 35_074_488,
    "eca_nfnet_l0": 24_143_924,
    "eca_nfnet_l1": 41_407_728,
    "eca_nfnet_l2": 56_722_348,
    "eca_nfnet_l3": 72_036_968,
}


def _shapes(params):
  return {(m, n): tuple(v.shape) for m, d in params.items()
          for n, v in d.items()}


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_parameter_count_is_timms(name):
  params = model_helpers.abstract_params(name)
  assert sum(math.prod(s) for s in _shapes(params).values()) == \
      TIMM_PARAMS[name]
  assert timm_helpers.fixture()["param_counts"][name] == TIMM_PARAMS[name]


def test_tree_is_timms_state_dict_key_for_key():
  timm_shapes = timm_helpers.fixture()["eca_nfnet_l0"]
  ours = _shapes(model_helpers.abstract_params("eca_nfnet_l0"))
  mapped = {}
  for key, shape in timm_shapes.items():
    path = nfnet_light.haiku_name(key, "NFNetLight")
    assert path not in mapped, f"{key} and {mapped[path]} map to {path}"
    mapped[path] = key
    array = nfnet_light.haiku_array(key, np.zeros(shape, np.float32))
    assert ours.get(path) == array.shape, (key, path, ours.get(path))
  assert set(mapped) == set(ours)
  assert len(timm_shapes) == len(ours) == 185


def test_key_mapping_examples():
  name, array = nfnet_light.haiku_name, nfnet_light.haiku_array
  assert name("stages.1.0.attn_last.conv.weight", "R") == (
      "R/~/stages_1_0/~/attn_last/~/conv", "w")
  assert name("head.fc.bias", "R") == ("R/~/linear", "b")
  assert name("stem.conv1.gain", "R") == ("R/~/stem/~/conv1", "gain")
  w = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)  # OIHW
  np.testing.assert_array_equal(array("x.weight", w)[4, 6, 2, 1],
                                w[1, 2, 4, 6])
  np.testing.assert_array_equal(array("head.fc.weight", w[0, 0]), w[0, 0].T)


@pytest.mark.parametrize("name", ["eca_nfnet_l0", "nfnet_l0"])
def test_tiny_model_reproduces_timms_logits(name):
  options, params, images, timm_logits = timm_helpers.tiny_case(
      name, "NFNetLight")
  model = models.build_model(name, num_classes=7, **options)
  assert _shapes(params) == _shapes(
      model_helpers.abstract_params(name, num_classes=7, **options))
  logits, _ = model_helpers.fast_jit(
      lambda p, x: model.apply(p, {}, None, x, is_training=False))(
          params, images)
  np.testing.assert_allclose(logits, timm_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_ch,out_ch,stride,attention", [
    (16, 32, 2, "eca"),
    (32, 32, 1, "se"),
])
def test_block_matches_timms_forward(in_ch, out_ch, stride, attention):
  """ECA and SE, strided and not, two grouped 3x3 convs: timm's formulas."""
  make_block = functools.partial(
      nfnet_light.NormFreeBlock, in_ch, out_ch, stride=stride,
      group_width=8, bottle_ratio=0.5, extra_conv=True, attention=attention,
      se_ratio=0.25, activation=jax.nn.silu, **timm_helpers.BLOCK_OPTIONS,
      gamma=layers.GAMMAS["silu"], name="block")
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, in_ch))
  timm_helpers.check_block(make_block, x, stride=stride,
                           groups=out_ch // 2 // 8, act=jax.nn.silu,
                           gamma=layers.GAMMAS["silu"])


# ------------------------------------------------ the model and its uses

def test_only_each_branch_s_last_conv_starts_with_zero_gain():
  block = hk.transform(lambda x: nfnet_light.NormFreeBlock(
      8, 16, stride=2, group_width=8, bottle_ratio=0.5, extra_conv=True,
      attention="eca", se_ratio=0.25, activation=jax.nn.silu, gamma=1.0,
      **timm_helpers.BLOCK_OPTIONS, name="block")(x, is_training=False))
  params = model_helpers.fast_jit(block.init)(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 4, 4, 8)))
  gains = {m: leaves["gain"] for m, leaves in params.items()
           if "gain" in leaves}
  assert len(gains) == 5  # conv1, conv2, conv2b, conv3, downsample/conv
  for module, gain in gains.items():
    np.testing.assert_array_equal(
        gain, 0.0 if module.endswith("/conv3") else 1.0, err_msg=module)
  assert not any("skip_gain" in leaves for leaves in params.values())


def test_metrics_remat_and_nows():
  options, params, images, _ = timm_helpers.tiny_case("eca_nfnet_l0",
                                                      "NFNetLight")

  def forward(name, **more):
    model = models.build_model(name, num_classes=7, **options, **more)
    return lambda p: model.apply(p, {}, None, images, is_training=False,
                                 return_metrics=True)[0]

  def loss_and_grads(**more):
    f = forward("eca_nfnet_l0", **more)

    def loss(p):
      logits, metrics = f(p)
      return jnp.sum(logits ** 2), metrics
    return model_helpers.fast_jit(jax.value_and_grad(loss, has_aux=True))(
        params)

  (value, metrics), grads = loss_and_grads()
  assert metrics["stage"].tolist() == [0, 1, 1, 2, 3]
  assert metrics["res_var"].shape == (5,)
  (value_remat, _), grads_remat = loss_and_grads(remat=True)
  np.testing.assert_allclose(value, value_remat, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-7), grads, grads_remat)
  logits, _ = model_helpers.fast_jit(forward("eca_nfnet_l0_nows"))(params)
  assert np.all(np.isfinite(logits))


def test_registry_and_image_sizes():
  for name in TIMM_PARAMS:
    assert name in models.MODELS and f"{name}_nows" in models.MODELS
  assert models.image_sizes("eca_nfnet_l0") == (224, 288)
  assert models.image_sizes("eca_nfnet_l2_nows") == (320, 384)
  with pytest.raises(ValueError, match="contradicts"):
    models.check_options("eca_nfnet_l0_nows", {"standardize": True})


def test_too_narrow_groups_are_a_clear_error():
  with pytest.raises(ValueError, match="narrower than the group width 64"):
    model_helpers.abstract_params("eca_nfnet_l0", width_multiplier=0.125)


def test_config_models_and_smoke():
  config = light_config.get_config("model=eca_nfnet_l2")
  assert config.model.name == "eca_nfnet_l2"
  assert (config.dataset.image_size, config.dataset.eval_image_size) == (
      320, 384)
  # Evaluated as timm's pretrained_cfg: the whole centred square, PIL bicubic.
  assert (config.dataset.eval_preproc, config.dataset.eval_interpolation) == (
      "crop_resize_1", "bicubic_antialias")
  assert config.optimizer.agc_clipping == 0.01
  smoke = light_config.get_config("model=nfnet_l0,smoke=True")
  assert smoke.dataset.name == "digits"
  assert (smoke.model.kwargs.width_multiplier,
          smoke.model.kwargs.group_width) == (0.25, 16)
  experiment_config.validate(smoke)
  params = model_helpers.abstract_params(smoke.model.name, num_classes=10,
                            **smoke.model.kwargs)
  # 805,086 (35,074,488 at full width).
  assert sum(math.prod(v.shape) for v in jax.tree.leaves(params)) < 1_000_000
  with pytest.raises(ValueError, match="unknown light NFNet 'nfnet_l1'"):
    light_config.get_config("model=nfnet_l1")
