"""The bundled default: a tiny NFNet on scikit-learn's 8x8 digits at 32x32.

  python experiments/train.py                        # this config
  python experiments/train.py --config=configs/digits.py --workdir=/tmp/d

Runs on a 2-core CPU in about 70 s and reaches 98.3-99.2% test accuracy with
the EMA weights (seeds 0-2; see BENCHMARKS.md). The NFNet recipe at toy scale:
SGD + Nesterov, AGC, weight decay on weights only, label smoothing, EMA;
float32 since CPUs have no fast bfloat16. Random shifts of 1 pixel
(`--config.dataset.augment_shift=1`) did not help at this length. Without AGC
the same learning rate diverges within the first 60 steps.
"""

from nfnets.training import experiment_config


def _options(arg):
  return experiment_config.parse_arg(arg, epochs=15.0, seed=0, seeds=3)


def get_sweep(arg=None):
  """Seeds 0 .. seeds-1 (the spread in BENCHMARKS.md): `seeds=N`."""
  return [{"seed": seed} for seed in range(_options(arg).seeds)]


def get_config(arg=None):
  """Returns the digits config; `arg` takes `epochs=N` and `seed=N`."""
  options = _options(arg)
  c = experiment_config.base_config()
  c.seed = options.seed
  c.dataset.update(dict(name="digits", image_size=32, eval_image_size=32,
                        num_classes=10, augment_shift=0))
  # 0.38M parameters: 1/8 of F0's widths, one block per stage, groups of 16
  # channels (groups of 8 train 2.5x slower on CPUs for no accuracy gain).
  c.model = experiment_config.model_config(
      "nfnet_f0", width_multiplier=0.125, group_width=16, depths=(1, 1, 1, 1),
      drop_path_rate=0.0, dropout_rate=0.0)
  c.batch_size = 64
  c.eval_batch_size = 360
  c.num_epochs = options.epochs
  c.optimizer.update(dict(base_lr=0.4, weight_decay=5e-5, agc_clipping=0.04,
                          warmup_epochs=1.0))
  c.ema.update(dict(decay=0.99, warmup=True))
  c.precision = "float32"
  c.checkpoint.update(dict(every_steps=100, max_to_keep=2))
  c.log_every_steps = 50
  return c
