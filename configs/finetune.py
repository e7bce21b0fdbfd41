"""Fine-tune a released NFNet on an image folder, with a new head.

  python experiments/train.py --config=configs/finetune.py --workdir=/tmp/ft \
      --config.init_from=F0_haiku.npz --config.dataset.data_dir=/data/flowers \
      --config.dataset.num_classes=5
  # Freeze the stem and the first two stages, or train only the head:
  ...  --config.optimizer.freeze_stages=2
  ...  --config.optimizer.linear_probe=True
  # A minute on a CPU: a tiny F0 on a generated 3-class folder.
  python experiments/train.py --config=configs/finetune.py:smoke=True \
      --workdir=/tmp/ft_smoke

`init_from` loads the released backbone (DeepMind's pickle, a safe `.npz`,
or a run of this project); the released 1000-class head does not fit the
folder's classes, so it is dropped and a new one starts at zero
(`fc_init_std=0`, `nfnets.training.loop._load_init_from`). Frozen stages
(`optimizer.freeze_stages`, `optimizer.linear_probe`; see
`nfnets.training.optim`) get no update, AGC or weight decay. The recipe is
the NFNet one scaled down for transfer: batch 256, 10 epochs, peak lr 0.01
after one epoch of warmup, no RandAugment or MixUp, the variant's train and
test resolutions, an EMA of about 1000 steps.

`variant=F1` (etc.) fine-tunes another variant; `smoke=True` writes a
3-class folder of random images under the temporary directory (once) and
fine-tunes a tiny F0 (1/8 widths, one block per stage) from scratch for 4
steps; set `init_from` to a file of that tiny model to test the loading.
"""

import os
import tempfile

import numpy as np
from PIL import Image

from nfnets import models
from nfnets.training import experiment_config

SMOKE_CLASSES = 3
SMOKE_IMAGES_PER_CLASS = 8


def _options(arg):
  return experiment_config.parse_arg(arg, variant="F0", smoke=False)


def write_smoke_folder(root: str) -> str:
  """Writes `SMOKE_CLASSES` folders of small random images (once)."""
  rng = np.random.default_rng(0)
  for k in range(SMOKE_CLASSES):
    folder = os.path.join(root, f"class_{k}")
    os.makedirs(folder, exist_ok=True)
    for i in range(SMOKE_IMAGES_PER_CLASS):
      # Class-coloured noise, so that a few steps can tell them apart.
      pixels = rng.integers(0, 128, (40, 48, 3)) + 64 * np.eye(3)[k % 3]
      path = os.path.join(folder, f"{i}.png")
      if not os.path.exists(path):
        Image.fromarray(pixels.astype(np.uint8)).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
  return root


def get_config(arg=None):
  """Returns the config; `arg` takes `variant=F0..F7[+]` and `smoke=bool`."""
  options = _options(arg)
  variant = options.variant.lower().replace("+", "plus")
  name = f"nfnet_{variant}"
  c = experiment_config.base_config()
  train_size, test_size = models.image_sizes(name)
  c.dataset.update(dict(name="image_folder", data_dir="", num_classes=0,
                        image_size=train_size, eval_image_size=test_size,
                        val_fraction=0.1))
  c.model = experiment_config.model_config(name, fc_init_std=0.0)
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 10.0
  c.optimizer.update(dict(base_lr=0.01, warmup_epochs=1.0))
  c.ema.update(dict(decay=0.999, warmup=True))
  c.checkpoint.every_steps = 500
  if options.smoke:
    experiment_config.shrink_model(c)
    c.dataset.update(dict(
        data_dir=write_smoke_folder(os.path.join(
            tempfile.gettempdir(), "nfnets_finetune_smoke")),
        num_classes=SMOKE_CLASSES, image_size=32, eval_image_size=32,
        val_fraction=0.25))
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_steps = 4
    c.optimizer.update(dict(base_lr=0.1, warmup_epochs=0.0))
    c.precision = "float32"
    c.checkpoint.every_steps = 4
    c.log_every_steps = 1
  return c
