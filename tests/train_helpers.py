"""The tiny trainer set-up shared by test_train.py and test_train_loop.py,
and `change_train_batch` for tests that disturb a run's data."""

import jax
from jax.sharding import Mesh
import numpy as np

from nfnets import models
from nfnets.data import digits
from nfnets.training import checkpoint
from nfnets.training import loop
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps

import configs.digits as digits_config  # pylint: disable=g-bad-import-order


def tiny_config(**overrides):
  """The digits config, shortened; overrides as dotted keys."""
  c = digits_config.get_config()
  c.optimizer.warmup_epochs = 0.0
  c.model.kwargs = dict(c.model.kwargs, depths=(1, 1, 1, 1))
  c.batch_size = 32
  c.eval_batch_size = 40
  c.num_steps = 6
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  c.log_every_steps = 3
  # The plain twins of the fast paths compile in about half the time on
  # CPUs; test_train.py's test_fast_paths_on_and_off_give_the_same_step
  # shows both give the same step (and asks for each by name).
  c.fast_paths = False
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def _parts(config, mesh):
  """The model, schedule, optimizer and (jitted) init of `config`."""
  model = models.build_model(config.model.name, num_classes=10,
                             **config.model.kwargs)
  schedule = optim.learning_rate_schedule(config, 100, 10)
  optimizer = optim.make_optimizer(config, schedule)
  init = steps.make_init(model, optimizer, (32, 32, 3), mesh)
  return model, schedule, optimizer, init


def setup(config, mesh):
  model, schedule, optimizer, init = _parts(config, mesh)
  state = init(jax.random.PRNGKey(0))
  step = steps.make_train_step(model, optimizer, schedule, config, mesh)
  return state, step


def restore_latest(config, workdir):
  """(state, data_state) of the newest readable checkpoint in `workdir`."""
  mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  # Shapes only: nothing is compiled or run.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=parallel.replicated_sharding(
                                         mesh)),
      jax.eval_shape(_parts(config, mesh)[3], jax.random.PRNGKey(0)))
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), 3, False)
  try:
    return ckpt.restore_latest(abstract)
  finally:
    ckpt.close()


def batch(n=32):
  images, labels = digits.load_digits("train")
  return {"images": images[:n], "labels": labels[:n]}


class _Changed:
  """A training iterator whose `n`-th batch (from 1), or every batch if `n`
  is None, goes through `change`."""

  def __init__(self, iterator, n, change):
    self.iterator, self.n, self.change, self.drawn = iterator, n, change, 0
    self.num_examples = iterator.num_examples
    self.get_state, self.set_state = iterator.get_state, iterator.set_state

  def __next__(self):
    batch = next(self.iterator)
    self.drawn += 1
    return self.change(dict(batch)) if self.n in (None, self.drawn) else batch


def changed_train_iterator(n, change):
  """`loop.data.train_iterator` with its `n`-th batch (from 1; every batch
  if None) passed through `change`, a function of the batch's dict that
  returns the batch to use (and may act: send a signal, wait)."""
  make_iterator = loop.data.train_iterator
  return lambda config: _Changed(make_iterator(config), n, change)


def change_train_batch(monkeypatch, n, change):
  """Makes the trainer's next training iterators `changed_train_iterator(n,
  change)`; `monkeypatch.undo()` ends it."""
  monkeypatch.setattr(loop.data, "train_iterator",
                      changed_train_iterator(n, change))
