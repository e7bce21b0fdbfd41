"""The models against the released code's constructors and their options.

google-deepmind/deepmind-research `nfnets/nfnet.py` (`use_two_convs`,
`final_conv_mult`, `final_conv_ch`, `bneck_pattern`, `group_pattern`),
`nfnets/nf_resnet.py` (`use_se`, `se_ratio`, `ResNet600`, the classifier's
N(0, 0.01^2) init) and `nfnets/base.py` (`StochDepth`, which does not rescale
kept branches). Full-size models are only traced (`jax.eval_shape`); what
runs is tiny.
"""

import os

from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from model_helpers import abstract_params
from model_helpers import fast_jit
from model_helpers import init_model
from model_helpers import set_skip_gains
from nfnets import models
from nfnets.models import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F0_PARAMS = 71_489_284  # the released F0 (tests/test_models.py)
# A tiny NFNet whose every block keeps the default group width of 8.
TINY = dict(width_multiplier=0.125, group_width=8, depths=(1, 1, 1, 1))


def _conv_params(kernel, in_ch, out_ch, groups=1):
  """A WSConv2D's w [k, k, in/groups, out], gain [out] and bias [out]."""
  return kernel * kernel * (in_ch // groups) * out_ch + 2 * out_ch


# ------------------------------------------------------------------- NFNet


def test_use_two_convs_false_removes_each_blocks_conv1b():
  params = abstract_params("nfnet_f0", use_two_convs=False)
  assert summary.count_params(abstract_params("nfnet_f0")) == F0_PARAMS
  # F0: stage widths (256, 512, 1536, 1536), bottlenecks half of them in
  # groups of 128, (1, 2, 6, 3) blocks; conv1b is [3, 3, 128, width].
  removed = sum(depth * _conv_params(3, width, width, width // 128)
                for width, depth in [(128, 1), (256, 2), (768, 6),
                                     (768, 3)])
  assert removed == 8_715_008
  assert summary.count_params(params) == F0_PARAMS - removed == 62_774_276
  assert not [m for m in params if m.endswith("conv1b")]
  assert len([m for m in params if m.endswith("~/conv1")]) == 12


@pytest.mark.parametrize("options,channels", [
    ({}, 384),  # twice the last stage's 192
    (dict(final_conv_mult=3.0), 576),
    (dict(final_conv_ch=100), 100),
    (dict(final_conv_ch=100, final_conv_mult=None), 100),  # released style
    (dict(final_conv_ch=100, final_conv_mult=2.0), 100),  # the default mult
])
def test_final_conv_width(options, channels):
  params = abstract_params("nfnet_f0", num_classes=7, **TINY, **options)
  assert params["NFNet/~/final_conv"]["w"].shape == (1, 1, 192, channels)
  assert params["NFNet/~/linear"]["w"].shape == (channels, 7)


@pytest.mark.parametrize("options,match", [
    (dict(final_conv_ch=100, final_conv_mult=3.0),
     "final_conv_ch=100 and final_conv_mult=3.0 both set"),
    (dict(final_conv_mult=None), "final_conv_mult=None needs final_conv_ch"),
    (dict(group_width=16, group_widths=(8, 8, 16, 16)),
     "group_width=16 and group_widths=.* both set"),
    (dict(expansion=(0.5, 0.25)), "expansion must be one value or 4"),
    (dict(expansion=0.05), "narrower than the group width 8"),
])
def test_bad_nfnet_option_combinations(options, match):
  with pytest.raises(ValueError, match=match):
    abstract_params("nfnet_f0", **dict(TINY, **options))


def test_expansion_and_group_widths_per_stage():
  overrides = dict(TINY, group_width=128, expansion=(0.5, 0.5, 0.25, 0.25),
                   group_widths=(8, 16, 8, 24))
  params = abstract_params("nfnet_f0", **overrides)
  # Stage widths 32, 64, 192, 192: bottleneck int(width * e) rounded down
  # to whole groups, as the released `NFBlock` does.
  widths = [params[f"NFNet/~/{b}/~/conv0"]["w"].shape[-1]
            for b in ("nf_block", "nf_block_1", "nf_block_2", "nf_block_3")]
  assert widths == [16, 32, 48, 48]
  group = [params[f"NFNet/~/{b}/~/conv1"]["w"].shape[2]
           for b in ("nf_block", "nf_block_1", "nf_block_2", "nf_block_3")]
  assert group == [8, 16, 8, 24]
  # One value for every stage is the same as four equal ones.
  scalar = abstract_params("nfnet_f0", **dict(TINY, expansion=0.25))
  listed = abstract_params("nfnet_f0", **dict(TINY, expansion=(0.25,) * 4))
  assert jax.tree.map(jnp.shape, scalar) == jax.tree.map(jnp.shape, listed)


def test_new_options_parse_from_a_command_line():
  types = models.option_types("nfnet_f0")
  assert (types["expansion"], types["group_widths"], types["final_conv_ch"],
          types["final_conv_mult"], types["use_two_convs"]) == (
              tuple, tuple, int, float, bool)
  argv = ["prog", f"--cfg={ROOT}/configs/nfnet.py:smoke=True",
          "--cfg.model.kwargs.expansion=(0.5, 0.5, 0.25, 0.25)",
          "--cfg.model.kwargs.group_width=128",
          "--cfg.model.kwargs.group_widths=(8, 8, 8, 8)",
          "--cfg.model.kwargs.final_conv_ch=100",
          "--cfg.model.kwargs.use_two_convs=False",
          "--cfg.model.kwargs.drop_path_scale_by_keep=True",
          "--cfg.model.kwargs.fc_init_std=0"]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "cfg", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  config = holder.value
  kwargs = config.model.kwargs.to_dict()
  assert kwargs["expansion"] == (0.5, 0.5, 0.25, 0.25)
  assert kwargs["group_widths"] == (8, 8, 8, 8)
  assert kwargs["fc_init_std"] == 0.0
  models.check_options(config.model.name, kwargs)
  params = abstract_params(config.model.name, **kwargs)
  assert params["NFNet/~/final_conv"]["w"].shape[-1] == 100
  assert params["NFNet/~/nf_block_3/~/conv0"]["w"].shape[-1] == 48


# --------------------------------------------------------------- NF-ResNet


def _nf_resnet_params(depths, se_ratio=0.0, num_classes=1000):
  """The released `NF_ResNet`'s parameter count, block by block."""
  total = _conv_params(7, 3, 64)  # initial_conv (with a bias)
  in_ch = 64
  for width, depth in zip((256, 512, 1024, 2048), depths):
    for j in range(depth):
      mid = width // 4
      total += (_conv_params(1, in_ch, mid) + _conv_params(3, mid, mid) +
                _conv_params(1, mid, width) + 1)  # + skip_gain
      if j == 0:
        total += _conv_params(1, in_ch, width)  # conv_shortcut
      if se_ratio:
        hidden = max(1, int(width * se_ratio))
        total += 2 * width * hidden + hidden + width
      in_ch = width
  return total + 2048 * num_classes + num_classes


@pytest.mark.parametrize("name,depths,options,expected", [
    ("nf_resnet50", (3, 4, 6, 3), {}, 25_557_048),
    ("nf_resnet50", (3, 4, 6, 3), dict(use_se=True), 35_635_704),
    ("nf_resnet600", (50, 50, 50, 50), {}, 300_646_896),
])
def test_nf_resnet_param_counts(name, depths, options, expected):
  se_ratio = 0.25 if options.get("use_se") else 0.0
  assert _nf_resnet_params(depths, se_ratio) == expected
  assert summary.count_params(abstract_params(name, **options)) == expected


def test_nf_resnet600_has_200_blocks():
  blocks = hk.transform(lambda: models.create_model("nf_resnet600").blocks)
  blocks = blocks.apply({}, None)
  assert len(blocks) == 200
  assert [b for b in blocks if b.conv_shortcut is not None] == [
      blocks[0], blocks[50], blocks[100], blocks[150]]


def test_nf_resnet_se_params_at_the_released_paths():
  params = abstract_params("nf_resnet26", use_se=True, se_ratio=0.5,
                            width_multiplier=0.125)
  # base.SqueezeExcite in each NFResBlock: two unnamed hk.Linear layers.
  se = {m: {k: v.shape for k, v in p.items()} for m, p in params.items()
        if "squeeze_excite" in m}
  assert len(se) == 2 * 8
  assert se["NFResNet/~/nf_res_block/~/squeeze_excite/~/linear"] == dict(
      w=(32, 16), b=(16,))
  assert se["NFResNet/~/nf_res_block_7/~/squeeze_excite/~/linear_1"] == dict(
      w=(128, 256), b=(256,))
  plain = abstract_params("nf_resnet26", width_multiplier=0.125)
  assert set(params) - set(se) == set(plain)


def test_classifier_init_std():
  params, _ = init_model("nf_resnet26", width_multiplier=0.125,
                         num_classes=1000)
  w = np.asarray(params["NFResNet/~/linear"]["w"])
  assert w.shape == (256, 1000)
  assert np.std(w) == pytest.approx(0.01, rel=0.02)
  assert abs(np.mean(w)) < 1e-4
  np.testing.assert_array_equal(params["NFResNet/~/linear"]["b"], 0)

  def classifier_init(name, **overrides):
    """The model's own classifier, initialised without the network."""
    head = hk.transform(lambda: models.create_model(
        name, num_classes=1000, **overrides).classifier(jnp.zeros((1, 256))))
    return next(iter(head.init(jax.random.PRNGKey(0)).values()))["w"]

  zeros = classifier_init("nf_resnet26", fc_init_std=0.0)
  np.testing.assert_array_equal(zeros, 0)
  wider = classifier_init("nfnet_f0", fc_init_std=0.05)
  assert np.std(wider) == pytest.approx(0.05, rel=0.02)


# ---------------------------------------------------------- stochastic depth


def test_stochastic_depth_keeps_examples_unscaled_in_a_model():
  """With drop rate 0.5 and no dropout, an example that keeps every branch
  gets its evaluation logits in training (the released StochDepth); with
  drop_path_scale_by_keep its kept branches are scaled up and none does."""
  overrides = dict(TINY, drop_path_rate=0.5, dropout_rate=0.0, num_classes=10)
  params, state = init_model("nfnet_f0", **overrides)
  params = set_skip_gains(params)
  images = jax.random.normal(jax.random.PRNGKey(1), (16, 32, 32, 3))

  def kept_whole(**options):
    """Which examples' training logits equal their evaluation logits."""
    model = models.build_model("nfnet_f0", **overrides, **options)
    run = fast_jit(lambda p, x: (
        model.apply(p, state, jax.random.PRNGKey(2), x, is_training=True)[0],
        model.apply(p, state, None, x, is_training=False)[0]))
    trained, evaluated = run(params, images)
    return np.all(np.isclose(trained, evaluated, rtol=1e-5, atol=1e-6),
                  axis=1)

  # Drop rates 0, 1/8, 2/8, 3/8: each example keeps all with p = 0.41.
  same = kept_whole()
  assert 0 < same.sum() < 16, same
  assert not kept_whole(drop_path_scale_by_keep=True).any()
