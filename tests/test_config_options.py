"""Every config takes every model option, from code and from a command line."""

import os

from absl import flags
import haiku as hk
from ml_collections import config_flags
import pytest

from configs import digits as digits_config
from configs import nf_resnet as nf_resnet_config
from configs import nfnet as nfnet_config
from configs import resnet as resnet_config
from nfnets import models
from nfnets.training import experiment_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NFNET = ("--cfg.model.kwargs.width_multiplier=0.125",
              "--cfg.model.kwargs.group_width=16",
              "--cfg.model.kwargs.depths=(1,1,1,1)")


def _parse(*args: str):
  """The config `experiments/train.py` would get from this command line."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      "cfg", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return holder.value


def _on_digits(config):
  """Points a (locked) config at the bundled digits so validate is quick."""
  config.dataset.update(dict(name="digits", image_size=32, eval_image_size=32,
                             num_classes=10, randaugment_layers=0,
                             mixup_alpha=0.0, cutmix_alpha=0.0))
  return config


def _module(config):
  """The Haiku module the config's model section builds."""
  return hk.transform(lambda: models.create_model(
      config.model.name, num_classes=config.dataset.num_classes,
      **config.model.kwargs)).apply({}, None)


@pytest.mark.parametrize("module,arg,explicit", [
    (digits_config, None, dict(width_multiplier=0.125, group_width=16,
                               depths=(1, 1, 1, 1), drop_path_rate=0.0,
                               dropout_rate=0.0)),
    (nfnet_config, "variant=F0", dict(drop_path_rate=0.25, dropout_rate=0.2)),
    (nf_resnet_config, None, dict(drop_path_rate=0.1, dropout_rate=0.25)),
    (resnet_config, None, dict(drop_path_rate=0.0, dropout_rate=0.0)),
])
def test_configs_hold_every_model_option(module, arg, explicit):
  config = module.get_config(arg)
  options = models.model_options(config.model.name)
  kwargs = config.model.kwargs.to_dict()
  assert set(kwargs) == set(options)
  assert {k: kwargs[k] for k in explicit} == explicit
  assert {k: v for k, v in kwargs.items() if k not in explicit} == {
      k: v for k, v in options.items() if k not in explicit}


def test_model_options_leave_out_what_the_name_fixes():
  assert "variant" not in models.model_options("nfnet_f3plus")
  assert "depth" not in models.model_options("nf_resnet101")
  assert "standardize" in models.model_options("nf_resnet50")
  assert "standardize" not in models.model_options("nf_resnet50_nows")
  assert models.model_options("resnet50") == dict(
      width_multiplier=1.0, drop_path_rate=0.0, drop_path_scale_by_keep=False,
      dropout_rate=0.0)
  assert models.option_types("nfnet_f0")["depths"] is tuple
  assert models.option_types("nfnet_f0")["dropout_rate"] is float
  assert models.option_types("nfnet_f0")["activation"] is str


def test_command_line_sets_any_option_with_its_type():
  config = _parse(f"--cfg={ROOT}/configs/nfnet.py", *TINY_NFNET,
                  "--cfg.model.kwargs.remat=True",
                  "--cfg.model.kwargs.dropout_rate=0.1",
                  "--cfg.model.kwargs.activation=relu")
  kwargs = config.model.kwargs
  assert kwargs.remat is True
  assert kwargs.width_multiplier == 0.125
  assert isinstance(kwargs.width_multiplier, float)
  assert kwargs.group_width == 16 and isinstance(kwargs.group_width, int)
  assert kwargs.depths == (1, 1, 1, 1)
  assert isinstance(kwargs.depths, tuple)
  assert kwargs.dropout_rate == 0.1  # F0 sets 0.2
  assert kwargs.activation == "relu"
  experiment_config.validate(_on_digits(config))
  model = _module(config)
  assert model.remat and len(model.blocks) == 4 and model.dropout_rate == 0.1


def test_command_line_sets_options_the_model_defaults_to_none():
  """A None default (the variant's own value) still takes a typed value."""
  plain = nfnet_config.get_config("variant=F0")
  plain.model = experiment_config.model_config("nfnet_f3")
  assert plain.model.kwargs.dropout_rate is None
  assert plain.model.kwargs.depths is None
  assert _module(plain).dropout_rate == 0.4  # F3's own
  smoke = _parse(f"--cfg={ROOT}/configs/nfnet.py:smoke=True",
                 "--cfg.model.kwargs.depths=(1, 2, 1, 1)")
  assert smoke.model.kwargs.depths == (1, 2, 1, 1)
  experiment_config.validate(smoke)
  assert len(_module(smoke).blocks) == 5


def test_the_model_swaps_within_its_family():
  config = _parse(f"--cfg={ROOT}/configs/nfnet.py", *TINY_NFNET,
                  "--cfg.model.name=nfnet_f3plus")
  experiment_config.validate(_on_digits(config))
  assert len(_module(config).blocks) == 4


def test_unknown_option_names_the_valid_ones():
  with pytest.raises((KeyError, AttributeError)):
    _parse(f"--cfg={ROOT}/configs/nfnet.py", "--cfg.model.kwargs.nope=1")
  config = nfnet_config.get_config("variant=F0")
  message = experiment_config.missing_key(config, "model.kwargs.nope")
  assert message.startswith("unknown key config.model.kwargs.nope; valid "
                            "keys of config.model.kwargs: activation, alpha, ")
  assert all(k in message for k in models.model_options("nfnet_f0"))
  assert "did you mean batch_size?" in experiment_config.missing_key(
      config, "batch_sise")
  assert experiment_config.missing_key(config, "model.kwargs.remat") is None
  with pytest.raises(ValueError, match="unknown option 'colour' for model "
                     "'nfnet_f0'; valid: width_multiplier, group_width"):
    experiment_config.model_config("nfnet_f0", colour="red")


def test_another_family_names_the_option_it_does_not_take():
  config = _parse(f"--cfg={ROOT}/configs/nfnet.py:smoke=True",
                  "--cfg.model.name=nf_resnet50")
  with pytest.raises(ValueError, match=r"^model.kwargs: unknown option "
                     r"'depths' for model 'nf_resnet50'; valid: "
                     r"width_multiplier, activation, alpha, drop_path_rate, "
                     r"drop_path_scale_by_keep, dropout_rate, use_se, "
                     r"se_ratio, fc_init_std, standardize, remat$"):
    experiment_config.validate(config)


def test_nows_name_is_not_undone_by_the_standardize_option():
  config = nf_resnet_config.get_config("smoke=True")
  config.model.name = "nf_resnet26_nows"
  with pytest.raises(ValueError, match="standardize=True contradicts model "
                     "'nf_resnet26_nows'"):
    experiment_config.validate(config)
  config.model.kwargs.standardize = False
  experiment_config.validate(config)


def test_only_deepmind_nf_resnet_smoke_shifts_its_digits():
  # configs/nf_resnet.py: 2-pixel shifts brought it into the digits band.
  shifts = {kind: nf_resnet_config.get_config(
      f"kind={kind},depth=26,smoke=True").dataset.augment_shift
            for kind in nf_resnet_config.KINDS}
  assert shifts == {"deepmind": 2, "timm": 0, "se": 0, "eca": 0}
  experiment_config.validate(nf_resnet_config.get_config("smoke=True"))


def test_smoke_shrinks_in_place_and_keeps_placeholders():
  config = nfnet_config.get_config("variant=F1,smoke=True")
  kwargs = config.model.kwargs
  assert (kwargs.width_multiplier, kwargs.group_width, kwargs.depths) == (
      0.125, 16, (1, 1, 1, 1))
  assert set(kwargs) == set(models.model_options("nfnet_f1"))
  wide = resnet_config.get_config("smoke=True")
  assert wide.model.kwargs.width_multiplier == 0.25
  # A None option made by model_config keeps its type after shrinking.
  f3 = nfnet_config.get_config("variant=F3")
  f3.model = experiment_config.model_config("nfnet_f3")
  experiment_config.shrink_model(f3)
  assert f3.model.kwargs.get_type("dropout_rate") is float
  model = _module(f3)
  assert len(model.blocks) == 4 and model.dropout_rate == 0.4
