"""The NF-ResNet baselines: BN, SkipInit and Fixup pre-activation ResNets.

  python experiments/train.py --config=configs/resnet.py:depth=50 \
      --workdir=/ckpt/resnet50
  python experiments/train.py --config=configs/resnet.py:kind=fixup,depth=50 \
      --workdir=/ckpt/fixup_resnet50

`kind` picks the model: `bn` (default) the batch-normalised ResNet
(`resnet{depth}`), `skipinit` or `fixup` the unnormalized baselines of the
ICLR 2021 paper (`skipinit_resnet{depth}`, `fixup_resnet{depth}`). All three
train with the same recipe: configs/nf_resnet.py's without AGC and without
stochastic depth or dropout (the released code's experiment gives no settings
of its own for SkipInit or Fixup); BatchNorm statistics are averaged across
devices after every step. `smoke=True` swaps in a tiny model on the bundled
digits data.
"""

from nfnets.training import experiment_config

KINDS = {"bn": "resnet", "skipinit": "skipinit_resnet", "fixup": "fixup_resnet"}


def get_config(arg=None):
  """Returns the config; `arg` takes `kind`, `depth=N` and `smoke=bool`."""
  options = experiment_config.parse_arg(arg, kind="bn", depth=50, smoke=False)
  if options.kind not in KINDS:
    raise ValueError(f"unknown config arg kind={options.kind}; valid: "
                     f"{', '.join(KINDS)}")
  c = experiment_config.base_config()
  c.model = experiment_config.model_config(
      f"{KINDS[options.kind]}{options.depth}", drop_path_rate=0.0,
      dropout_rate=0.0)
  c.dataset.update(dict(name="imagenet2012", image_size=224,
                        eval_image_size=224, num_classes=1000))
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.optimizer.update(dict(weight_decay=5e-5, agc_clipping=0.0))
  if options.smoke:
    # SkipInit: random shifts of up to 2 pixels (half a digit's pixel) took
    # its seeds 0-2 from 98.61 / 97.49 / 98.89% to 99.16 / 98.89 / 98.61%;
    # shifts of 1 or 4 left seed 1 short (BENCHMARKS.md).
    experiment_config.make_smoke_test(
        c, augment_shift=2 if options.kind == "skipinit" else 0)
    if options.kind != "bn":
      # The zero-initialised residual branches and classifier give SkipInit
      # and Fixup a long flat start on the digits; a classifier drawn from
      # N(0, 0.01^2) shortens it (BENCHMARKS.md).
      c.model.kwargs.fc_init_std = 0.01
    if options.kind == "fixup":
      # Fixup's start is unstable at this scale (at batch 32, no learning at
      # a peak lr of 0.0375, learning at 0.025 and 0.05): 3 epochs of
      # warmup, not 1. At 1/4 width its seeds 0-2 reached 98.33 / 98.61 /
      # 97.77%, at 1/2 98.33% each (BENCHMARKS.md).
      c.optimizer.warmup_epochs = 3.0
      c.model.kwargs.width_multiplier = 0.5
  return c
