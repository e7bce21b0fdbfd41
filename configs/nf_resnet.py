"""NF-ResNets (ICLR 2021) on ImageNet: `depth=26|50|101|152|200|288|600`.

  python experiments/train.py --config=configs/nf_resnet.py:depth=50 \
      --workdir=/ckpt/nf_resnet50
  python experiments/train.py --config=configs/nf_resnet.py:kind=se,depth=50 \
      --workdir=/ckpt/nf_seresnet50

`kind` picks the network: `deepmind` (default) the released code's
NF-ResNet (`nf_resnet{depth}`); timm's NF-ResNets, depths 26, 50 and 101:
`timm` (`nf_resnet{depth}_timm`), `se` (`nf_seresnet{depth}`) and `eca`
(`nf_ecaresnet{depth}`), at the resolutions and evaluation crop of their
timm `pretrained_cfg` (`nfnets.weight_preprocessing`). All train with the
NFNet recipe's optimizer (SGD + Nesterov, warmup + cosine, weight decay on
weights only, AGC off by default as in the ICLR paper, label smoothing,
EMA), DeepMind's at 224 px with its stochastic depth 0.1 and dropout 0.25.
`smoke=True` swaps in a tiny model on the bundled digits data.
"""

from nfnets import weight_preprocessing
from nfnets.models import nf_resnet_timm
from nfnets.training import experiment_config

KINDS = {"deepmind": "nf_resnet{}", "timm": "nf_resnet{}_timm",
         "se": "nf_seresnet{}", "eca": "nf_ecaresnet{}"}


def _options(arg):
  return experiment_config.parse_arg(arg, kind="deepmind", depth=50,
                                     agc=False, smoke=False,
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
  """Returns the config; `arg` takes `kind`, `depth=N`, `agc`, `smoke`."""
  options = _options(arg)
  if options.kind not in KINDS:
    raise ValueError(f"unknown config arg kind={options.kind}; valid: "
                     f"{', '.join(KINDS)}")
  if options.kind != "deepmind" and options.depth not in nf_resnet_timm.DEPTHS:
    raise ValueError(f"kind={options.kind} has depths "
                     f"{', '.join(map(str, nf_resnet_timm.DEPTHS))}; got "
                     f"depth={options.depth}")
  c = experiment_config.base_config()
  name = KINDS[options.kind].format(options.depth)
  c.dataset.update(dict(name="imagenet2012", image_size=224,
                        eval_image_size=224, num_classes=1000))
  if options.kind == "deepmind":
    c.model = experiment_config.model_config(name, drop_path_rate=0.1,
                                             dropout_rate=0.25)
  else:
    c.model = experiment_config.model_config(name)
    preprocessing = weight_preprocessing.preprocessing(name)
    c.dataset.image_size = preprocessing.image_size
    c.dataset.update(preprocessing.dataset_overrides())
  c.batch_size = 1024
  c.num_epochs = 90.0
  c.optimizer.update(dict(weight_decay=5e-5,
                          agc_clipping=0.01 if options.agc else 0.0))
  if options.smoke:
    # DeepMind's NF-ResNet: random shifts of up to 2 pixels (half a digit's
    # pixel), as SkipInit's smoke run (configs/resnet.py), took its seeds 0-2
    # from 98.33 / 98.33 / 97.21% to 98.89 / 98.61 / 98.61% (shifts of 1:
    # 98.61 / 99.16 / 98.89%; BENCHMARKS.md); the families already in the
    # band train unshifted.
    experiment_config.make_smoke_test(
        c, augment_shift=2 if options.kind == "deepmind" else 0)
  return c
