"""NF-ResNets (ICLR 2021) on ImageNet: `depth=26|50|101|152|200|288`.

  python experiments/train.py --config=configs/nf_resnet.py:depth=50 \
      --workdir=/ckpt/nf_resnet50

Trained with the NFNet recipe's optimizer (SGD + Nesterov, warmup + cosine,
weight decay on weights only, AGC off by default as in the ICLR paper,
label smoothing, EMA) at 224 px. `smoke=True` swaps in a tiny model on the
bundled digits data.
"""

from nfnets.training import experiment_config


def _options(arg):
  return experiment_config.parse_arg(arg, depth=50, agc=False, smoke=False,
                                     sweep="agc_batch")


def get_sweep(arg=None):
  """`sweep=agc_batch`: AGC clipping threshold vs batch size (ICML 2021).

  The paper's figure of top-1 against the clipping threshold for batch sizes
  256 to 4096 (NF-ResNet-50, AGC on): smaller batches tolerate larger
  thresholds.
  """
  options = _options(arg)
  if options.sweep != "agc_batch":
    raise ValueError(f"unknown sweep {options.sweep!r}; valid: agc_batch")
  return [{"batch_size": batch, "optimizer.agc_clipping": clipping}
          for batch in (256, 512, 1024, 2048, 4096)
          for clipping in (0.01, 0.02, 0.04, 0.08, 0.16)]


def get_config(arg=None):
  """Returns the config; `arg` takes `depth=N`, `agc=bool`, `smoke=bool`."""
  options = _options(arg)
  c = experiment_config.base_config()
  c.model = experiment_config.model_config(
      f"nf_resnet{options.depth}", drop_path_rate=0.1, dropout_rate=0.25)
  c.dataset.update(dict(name="imagenet2012", image_size=224,
                        eval_image_size=224, num_classes=1000))
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.optimizer.update(dict(weight_decay=5e-5,
                          agc_clipping=0.01 if options.agc else 0.0))
  if options.smoke:
    experiment_config.make_smoke_test(c)
  return c
