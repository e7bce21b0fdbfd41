"""NFNet F0-F7 (and F0+ to F7+) on ImageNet with the paper's recipe.

  python experiments/train.py --config=configs/nfnet.py:variant=F1 \
      --workdir=/ckpt/f1 --config.batch_size=1024 \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.manual_dir=/data/ilsvrc2012_tars

Defaults follow Brock, De, Smith, Simonyan, ICML 2021, "High-Performance
Large-Scale Image Recognition Without Normalization", App. C, and DeepMind's
released code (google-deepmind/deepmind-research
`nfnets/experiment_nfnets.py`): batch 4096, lr 0.1 * batch / 256 over
`examples * 360 // batch` steps, a fractional 5-epoch warmup then cosine
decay, SGD + Nesterov 0.9, weight decay 2e-5 on weights only, AGC 0.01 on
all but the classifier weight, label smoothing 0.1, bfloat16 training and
float32 evaluation, EMA 0.99999 (warmed up), train/test resolution, dropout
and stochastic depth 0.25 (kept branches not rescaled) per variant;
Inception crop, flip, RandAugment (layers, magnitude) per variant, MixUp
(alpha 0.2) and CutMix (alpha 1); `resize_crop_32` evaluation with TF's
bicubic resize. docs/fidelity.md compares each element with the released
code. For batch 4096 on fewer devices than a pod, set
`--config.accumulation_steps` (README, "Training"). `smoke=True` swaps in a
tiny model on the bundled digits data, to check a set-up end to end in a
minute. ImageNet comes from TFDS: `dataset.manual_dir` holds the ILSVRC2012
tars, prepared once into `dataset.data_dir` (nfnets/data).

`get_sweep` ships F0 to F7 at their resolutions (experiments/sweep.py).
"""

from nfnets.models import nfnet
from nfnets.training import experiment_config


def _options(arg):
  return experiment_config.parse_arg(arg, variant="F0", smoke=False,
                                     sweep="variants")


def get_sweep(arg=None):
  """`sweep=variants`: F0 to F7 at their train and test resolutions."""
  options = _options(arg)
  if options.sweep != "variants":
    raise ValueError(f"unknown sweep {options.sweep!r}; valid: variants")
  runs = []
  for k in range(len(nfnet.VARIANTS)):
    row = nfnet.VARIANTS[f"F{k}"]
    runs.append({"model.name": f"nfnet_f{k}",
                 "dataset.image_size": row.train_image_size,
                 "dataset.eval_image_size": row.test_image_size,
                 "dataset.randaugment_layers": row.randaugment[0],
                 "dataset.randaugment_magnitude": float(row.randaugment[1]),
                 "model.kwargs.dropout_rate": row.dropout_rate})
  return runs


def get_config(arg=None):
  """Returns the config; `arg` takes `variant=F0..F7[+]` and `smoke=bool`."""
  options = _options(arg)
  row, _ = nfnet.parse_variant(options.variant)
  c = experiment_config.base_config()
  suffix = "plus" if options.variant.endswith("+") else ""
  c.model = experiment_config.model_config(
      f"nfnet_{options.variant.lower().rstrip('+')}{suffix}",
      drop_path_rate=0.25, dropout_rate=row.dropout_rate)
  c.dataset.update(dict(name="imagenet2012", image_size=row.train_image_size,
                        eval_image_size=row.test_image_size,
                        num_classes=1000,
                        randaugment_layers=row.randaugment[0],
                        randaugment_magnitude=float(row.randaugment[1]),
                        mixup_alpha=0.2, cutmix_alpha=1.0))
  if options.smoke:
    experiment_config.make_smoke_test(c)
  return c
