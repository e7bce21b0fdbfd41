"""NF-RegNet B0-B8 on ImageNet with the released code's recipe.

  python experiments/train.py --config=configs/nf_regnet.py:variant=B0 \
      --workdir=/ckpt/nf_regnet_b0 \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.manual_dir=/data/ilsvrc2012_tars

Defaults follow Brock, De, Smith, ICLR 2021, "Characterizing signal
propagation to close the performance gap in unnormalized ResNets" (its
NF-RegNets), and DeepMind's released code (google-deepmind/deepmind-research
`nfnets/experiment_nf_regnets.py` on `nfnets/experiment.py`): batch 1024,
lr 0.4 not scaled by the batch size over `examples * 360 // batch` steps, a
fractional 5-epoch warmup then cosine decay to 0.001, SGD + Nesterov 0.9
without AGC, weight decay `5e-5 + 1e-5 * level` (B0: 5e-5) on weights only,
label smoothing 0.1, MixUp (alpha 0.2) and CutMix, no RandAugment, float32
training (its `bfloat16=False`), EMA 0.99999 (warmed up), the variant's
train/test resolution and dropout, stochastic depth 0.1, and its default
`crop_resize` evaluation (centre crop, then resize). The released table of
weight decays stops at B5 (B6-B8 raise a KeyError there); here B6-B8
continue its formula. `smoke=True` swaps in a tiny model on the bundled
digits data, to check a set-up end to end in about a minute (with AGC: see
`_shrink_for_smoke`).

`get_sweep` ships B0 to B8 at their resolutions (experiments/sweep.py).
"""

from nfnets.models import nf_regnet
from nfnets.training import experiment_config


def _options(arg):
  return experiment_config.parse_arg(arg, variant="B0", smoke=False,
                                     sweep="variants")


def weight_decay(variant: str) -> float:
  """`5e-5 + 1e-5 * level` for B<level> (the released code's B0-B5 table)."""
  nf_regnet.parse_variant(variant)
  return 5e-5 + 1e-5 * int(variant[1:])


def _model_name(variant: str) -> str:
  return f"nf_regnet_{variant.lower()}"


def get_sweep(arg=None):
  """`sweep=variants`: B0 to B8 at their resolutions, dropout and decay."""
  options = _options(arg)
  if options.sweep != "variants":
    raise ValueError(f"unknown sweep {options.sweep!r}; valid: variants")
  runs = []
  for variant, row in nf_regnet.VARIANTS.items():
    runs.append({"model.name": _model_name(variant),
                 "dataset.image_size": row.train_image_size,
                 "dataset.eval_image_size": row.test_image_size,
                 "model.kwargs.dropout_rate": row.dropout_rate,
                 "optimizer.weight_decay": weight_decay(variant)})
  return runs


def _shrink_for_smoke(c):
  """The smoke test, tuned to learn the digits in about a minute.

  `make_smoke_test` gives the tiny model, the digits data and the digits
  config's optimizer. Without AGC the tiny NF-RegNet stalls or diverges at
  learning rates that learn the digits in this time (peak 0.01-0.1 over 15
  epochs: 18-94%), so the run is shrunk as a family trained with AGC (the
  digits config's AGC 0.04 and 1 epoch of warmup), with classifier init
  N(0, 0.01^2), no dropout or stochastic depth, and the recipe's peak lr 0.4
  unscaled by batch, for 20 epochs, at batch 16: at batch 64 (32) seeds 0-2
  reached 98.61 / 98.33 / 98.05% (98.05 / 98.33 / 98.61%), at 16 98.61 /
  98.89 / 98.61% (BENCHMARKS.md).
  """
  c.optimizer.agc_clipping = 0.04  # make_smoke_test's AGC settings
  experiment_config.make_smoke_test(c, batch_size=16)
  c.model.kwargs.update(dict(fc_init_std=0.01, dropout_rate=0.0,
                             drop_path_rate=0.0))
  c.num_epochs = 20.0
  c.optimizer.update(dict(base_lr=0.4, scale_lr_by_batch=False))
  c.checkpoint.every_steps = 100
  c.log_every_steps = 50


def get_config(arg=None):
  """Returns the config; `arg` takes `variant=B0..B8` and `smoke=bool`."""
  options = _options(arg)
  variant = options.variant.upper()
  row = nf_regnet.parse_variant(variant)
  c = experiment_config.base_config()
  c.model = experiment_config.model_config(
      _model_name(variant), drop_path_rate=0.1, dropout_rate=row.dropout_rate)
  c.dataset.update(dict(name="imagenet2012", image_size=row.train_image_size,
                        eval_image_size=row.test_image_size,
                        num_classes=1000, mixup_alpha=0.2, cutmix_alpha=1.0,
                        eval_preproc="crop_resize"))
  c.batch_size = 1024
  c.num_epochs = 360.0
  c.optimizer.update(dict(base_lr=0.4, scale_lr_by_batch=False, min_lr=0.001,
                          warmup_epochs=5.0, weight_decay=weight_decay(variant),
                          agc_clipping=0.0))
  c.precision = "float32"
  if options.smoke:
    _shrink_for_smoke(c)
  return c
