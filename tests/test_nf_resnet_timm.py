"""timm's SE/ECA NF-ResNets (`nfnets.models.nf_resnet_timm`) against timm.

As tests/test_nfnet_light.py: the numbers from timm come from the fixture
that scripts/timm_fixture.py wrote with timm 1.0.31.
"""

import functools
import math

import haiku as hk
import jax
import numpy as np
import pytest

from configs import nf_resnet as nf_resnet_config
from nfnets import layers
from nfnets import models
from nfnets.models import nf_resnet_timm
from nfnets.models import nfnet_light
from nfnets.training import experiment_config
import model_helpers
import timm_helpers

# sum(p.numel() for p in timm.create_model(name).parameters()), timm 1.0.31,
# on meta-device models (scripts/timm_fixture.py; also in the fixture).
TIMM_PARAMS = {
    "nf_seresnet26": 17_395_976,
    "nf_seresnet50": 28_088_024,
    "nf_seresnet101": 49_326_872,
    "nf_ecaresnet26": 15_995_220,
    "nf_ecaresnet50": 25_557_118,
    "nf_ecaresnet101": 44_549_331,
}
# timm's plain NF-ResNets (ours: `<name>_timm`), counted the same way; not
# in the fixture's `param_counts`.
TIMM_PLAIN_PARAMS = {
    "nf_resnet26_timm": 15_995_176,
    "nf_resnet50_timm": 25_557_032,
    "nf_resnet101_timm": 44_549_160,
}


def _shapes(params):
  return {(m, n): tuple(v.shape) for m, d in params.items()
          for n, v in d.items()}


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_parameter_count_is_timms(name):
  params = model_helpers.abstract_params(name)
  assert sum(math.prod(v.shape) for v in jax.tree.leaves(params)) == \
      TIMM_PARAMS[name]
  assert timm_helpers.fixture()["param_counts"][name] == TIMM_PARAMS[name]


@pytest.mark.parametrize("name", list(TIMM_PLAIN_PARAMS))
def test_plain_nf_resnet_parameter_count_is_timms(name):
  params = model_helpers.abstract_params(name)
  assert sum(math.prod(v.shape) for v in jax.tree.leaves(params)) == \
      TIMM_PLAIN_PARAMS[name]


@pytest.mark.parametrize("name", ["nf_ecaresnet26", "nf_seresnet26"])
def test_tiny_model_reproduces_timms_logits(name):
  """Also the tree: timm's keys map one to one onto our parameters."""
  options, params, images, timm_logits = timm_helpers.tiny_case(
      name, "NFResNetTimm")
  model = models.build_model(name, num_classes=7, **options)
  assert _shapes(params) == _shapes(
      model_helpers.abstract_params(name, num_classes=7, **options))
  logits, _ = model_helpers.fast_jit(
      lambda p, x: model.apply(p, {}, None, x, is_training=False))(
          params, images)
  np.testing.assert_allclose(logits, timm_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_ch,out_ch,stride,attention", [
    (16, 32, 2, "se"),
    (32, 32, 1, "eca"),
])
def test_block_matches_timms_forward(in_ch, out_ch, stride, attention):
  """The ResNet form: one ungrouped 3x3 conv, ReLU, SE hidden width 1/16."""
  relu = layers.ACTIVATIONS["relu"]
  make_block = functools.partial(
      nfnet_light.NormFreeBlock, in_ch, out_ch, stride=stride,
      group_width=None, bottle_ratio=0.25, extra_conv=False,
      attention=attention, se_ratio=1 / 16, activation=relu,
      gamma=layers.GAMMAS["relu"], **timm_helpers.BLOCK_OPTIONS,
      name="block")
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, in_ch))
  timm_helpers.check_block(make_block, x, stride=stride, groups=1, act=relu,
                           gamma=layers.GAMMAS["relu"])


def test_registry_options_and_errors():
  for name in TIMM_PARAMS:
    assert f"{name}_nows" in models.MODELS
  with pytest.raises(ValueError, match="contradicts"):
    models.check_options("nf_seresnet50", {"attention": "eca"})
  assert "attention" not in models.model_options("nf_ecaresnet26")
  with pytest.raises(ValueError, match="unknown timm NF-ResNet depth 152"):
    hk.transform(lambda: nf_resnet_timm.NFResNetTimm(depth=152)).init(None)
  with pytest.raises(ValueError, match="unknown attention 'ge'"):
    hk.transform(lambda: nf_resnet_timm.NFResNetTimm(attention="ge")).init(
        None)


def test_config_kinds_train_at_timms_sizes():
  se = nf_resnet_config.get_config("kind=se,depth=101")
  assert se.model.name == "nf_seresnet101"
  assert (se.dataset.image_size, se.dataset.eval_image_size,
          se.dataset.eval_preproc, se.dataset.eval_interpolation) == (
              224, 224, "crop_resize_0.9", "bicubic_antialias")
  plain = nf_resnet_config.get_config("kind=timm,depth=50")
  assert plain.model.name == "nf_resnet50_timm"
  assert (plain.dataset.image_size, plain.dataset.eval_image_size,
          plain.dataset.eval_preproc) == (256, 288, "crop_resize_0.94")
  smoke = nf_resnet_config.get_config("kind=eca,depth=26,smoke=True")
  experiment_config.validate(smoke)
  assert smoke.model.name == "nf_ecaresnet26"
  assert smoke.dataset.name == "digits"
  with pytest.raises(ValueError, match="kind=se has depths 26, 50, 101; "
                     "got depth=152"):
    nf_resnet_config.get_config("kind=se,depth=152")
  with pytest.raises(ValueError, match="unknown config arg kind=bn"):
    nf_resnet_config.get_config("kind=bn")
