"""The tiny trainer set-up shared by the trainer tests (test_train.py,
test_recipe.py, test_train_loop.py, ...): configs, meshes, steps compiled
with cheaper XLA:CPU options, and `change_train_batch` for tests that
disturb a run's data."""

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

import model_helpers  # pylint: disable=g-bad-import-order
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


def shared_config(**overrides):
  """The tiny config (batch 32) with a constant EMA decay of 0.9 and twice
  the base learning rate: the peak of batch 64's, 0.1, with which two steps
  move some weight by over 1e-3.

  test_train.py's shared steps and test_recipe.py's checkpoint test train
  the tiny NFNet with it on 1 device: one program, which the persistent
  compilation cache (tests/conftest.py) compiles once.
  """
  config = tiny_config(**{"ema.decay": 0.9, "ema.warmup": False,
                          **overrides})
  config.optimizer.base_lr *= 2
  return config


def mesh(count=None):
  """The 'data' mesh over the first `count` devices (all if None)."""
  return Mesh(np.asarray(jax.devices()[:count]), (parallel.AXIS,))


def fast_compiled(jitted, *args):
  """`jitted` (a `jax.jit` function) compiled for `args` with
  `model_helpers.fast_compile_options()`: XLA:CPU's classic kernels compile
  a train step in up to half the CPU time. The same program (donation
  included), to be called with arguments of the same shapes."""
  return jitted.lower(*args).compile(
      model_helpers.fast_compile_options() or None)


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


def on_devices(config, host_state, count):
  """(state, step, mesh) of `config` on `count` devices, the state
  `host_state` (a host copy of `setup`'s) replicated: the same start as
  `setup`'s init on any mesh, without compiling that init again."""
  devices = mesh(count)
  model, schedule, optimizer, _ = _parts(config, devices)
  step = steps.make_train_step(model, optimizer, schedule, config, devices)
  return parallel.replicate(host_state, devices), step, devices


def restore_latest(config, workdir):
  """(state, data_state) of the newest readable checkpoint in `workdir`."""
  devices = mesh()
  # Shapes only: nothing is compiled or run.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=parallel.replicated_sharding(
                                         devices)),
      jax.eval_shape(_parts(config, devices)[3], jax.random.PRNGKey(0)))
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
