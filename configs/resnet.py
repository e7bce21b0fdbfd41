"""Batch-normalised pre-activation ResNets: the NF-ResNet baseline.

  python experiments/train.py --config=configs/resnet.py:depth=50 \
      --workdir=/ckpt/resnet50

Same recipe as configs/nf_resnet.py without AGC; BatchNorm statistics are
averaged across devices after every step. `smoke=True` swaps in a tiny model
on the bundled digits data.
"""

from nfnets.training import experiment_config


def get_config(arg=None):
  """Returns the config; `arg` takes `depth=N` and `smoke=bool`."""
  options = experiment_config.parse_arg(arg, depth=50, smoke=False)
  c = experiment_config.base_config()
  c.model = experiment_config.model_config(
      f"resnet{options.depth}", drop_path_rate=0.0, dropout_rate=0.0)
  c.dataset.update(dict(name="imagenet2012", image_size=224,
                        eval_image_size=224, num_classes=1000))
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.optimizer.update(dict(weight_decay=5e-5, agc_clipping=0.0))
  if options.smoke:
    experiment_config.make_smoke_test(c)
  return c
