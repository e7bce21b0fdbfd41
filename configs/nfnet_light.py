"""timm's light NFNets (`eca_nfnet_l0` to `l3`, `nfnet_l0`) on ImageNet.

  python experiments/train.py \
      --config=configs/nfnet_light.py:model=eca_nfnet_l1 \
      --workdir=/ckpt/eca_l1 --config.dataset.data_dir=/data/tfds

timm's own recipe for its pretrained weights is not in timm; they were
trained with AGC, as the NFNets, so this config keeps DeepMind's NFNet
recipe (configs/nfnet.py: SGD + Nesterov, lr 0.1 * batch / 256, warmup and
cosine decay over 360 epochs, weight decay 2e-5 on weights only, AGC 0.01
on all but the classifier weight, label smoothing 0.1, EMA, MixUp and
CutMix) with the dropout, stochastic depth and RandAugment of the F-variant
of the same depths (L0 as F0, ..., L3 as F3), at timm's train and test
resolutions. Evaluation is as timm's `pretrained_cfg` for the model's
weights (`nfnets.weight_preprocessing`, which has those resolutions too):
at the test size (288 for L0), the whole centred square resized with PIL's
bicubic (`crop_resize_1`, `bicubic_antialias`). `smoke=True` swaps in a tiny
model on the bundled digits data, to check a set-up end to end in about
two minutes; at batch 32 (the digits config's peak lr 0.1 over twice its
steps), which lifted the light NFNets' seeds 0-2 from
98.05-99.16% to 98.33-99.44% (BENCHMARKS.md).
"""

from nfnets import weight_preprocessing
from nfnets.models import nfnet
from nfnets.models import nfnet_light
from nfnets.training import experiment_config


def get_config(arg=None):
  """Returns the config; `arg` takes `model=<name>` and `smoke=bool`."""
  options = experiment_config.parse_arg(arg, model="eca_nfnet_l0",
                                        smoke=False)
  if options.model not in nfnet_light.VARIANTS:
    raise ValueError(f"unknown light NFNet {options.model!r}; valid: "
                     f"{', '.join(nfnet_light.VARIANTS)}")
  row = nfnet.VARIANTS[f"F{options.model[-1]}"]
  timm_cfg = weight_preprocessing.preprocessing(options.model)
  c = experiment_config.base_config()
  c.model = experiment_config.model_config(
      options.model, drop_path_rate=0.25, dropout_rate=row.dropout_rate)
  c.dataset.update(dict(name="imagenet2012",
                        image_size=timm_cfg.image_size,
                        num_classes=1000,
                        randaugment_layers=row.randaugment[0],
                        randaugment_magnitude=float(row.randaugment[1]),
                        mixup_alpha=0.2, cutmix_alpha=1.0))
  c.dataset.update(timm_cfg.dataset_overrides())
  if options.smoke:
    experiment_config.make_smoke_test(c, batch_size=32)
  return c
