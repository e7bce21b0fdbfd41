"""`train_and_evaluate(config, workdir, mode)`: the loop users run.

Resume order: the workdir's newest readable checkpoint, then
`config.init_from` (weights only), then a fresh init. Checkpoints are saved
every `checkpoint.every_steps`, at the end and on SIGTERM (preemption,
checked after every train step and every eval batch); a non-finite loss, or
a loss spike when `config.loss_spike.factor` is set, stops the run after
saving the last good state.
"""

import json
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets import agc
from nfnets import data
from nfnets import models
from nfnets import released_weights
from nfnets.training import checkpoint
from nfnets.training import experiment_config
from nfnets.training import optim
from nfnets.training import parallel
from nfnets.training import steps
from nfnets.training import weights_io
from nfnets.training.metrics import MetricWriter


class NonFiniteLossError(ValueError):
  """The loss or gradient became NaN or inf."""


class LossSpikeError(ValueError):
  """The loss jumped over `loss_spike.factor` times its running average."""


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir if needed; a clear error if it is not writable."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create workdir {workdir}: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir} is not writable")
  return workdir


def _load_init_from(path: str, abstract: steps.TrainState,
                    fresh: steps.TrainState) -> tuple[Any, Any, Any]:
  """Weights from another run or a released file, checked against the model.

  A classifier of another width (fine-tuning to new classes) keeps its fresh
  initialisation; any other mismatch is an error naming the module. The
  model state (batch-norm statistics) comes with the weights from a run;
  a file has none, and the fresh one is kept.

  Args:
    path: a run's workdir or checkpoint, or a weights file.
    abstract: the state's shapes, for the checks.
    fresh: a freshly initialised state (its classifier may be kept).

  Returns:
    (params, ema_params, model_state, ema_model_state) as host arrays.
  """
  loaded = weights_io.load_weights(path)
  head = agc.classifier_module(abstract.params)
  shapes = lambda leaves: {k: np.shape(v) for k, v in leaves.items()}
  head_fits = (shapes(abstract.params[head]) ==
               shapes(loaded["params"].get(head, {})))
  skip = () if head_fits else (head,)
  if skip:
    logging.warning("init_from %s: classifier %s does not match the %d "
                    "classes; it is re-initialised", path, head,
                    abstract.params[head]["b"].shape[0])
  source = f"init_from {path}"
  if abstract.model_state and not loaded["model_state"]:
    logging.warning("init_from %s holds no model state (e.g. batch-norm "
                    "statistics); the fresh one is kept", path)
    loaded["model_state"] = jax.device_get(fresh.model_state)
    loaded["ema_model_state"] = loaded["model_state"]
  result = []
  for key in ("params", "ema_params", "model_state", "ema_model_state"):
    released_weights.check_fits(loaded[key], getattr(abstract, key), source,
                                skip)
    own = jax.device_get(getattr(fresh, key))
    result.append({
        module: {name: np.asarray(
            own[module][name] if module in skip else loaded[key][module][name],
            own[module][name].dtype) for name in leaves}
        for module, leaves in own.items()})
  return tuple(result)


class _Preemption:
  """Says, after each train step and each eval batch, whether to stop.

  One process: a SIGTERM handler sets a flag. Several processes: JAX's
  preemption service (started by `jax.distributed`, which catches SIGTERM
  itself) agrees on one sync point for all, so that every process stops at
  the same train step or eval batch and none waits in a collective for a
  peer that stopped. Its sync points are the calls to `requested`, counted:
  every process makes the same calls in the same order.
  """

  def __init__(self):
    self._flag = False
    self._previous = None
    self._calls = 0
    self._multi = jax.process_count() > 1
    if not self._multi and (threading.current_thread() is
                            threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def requested(self) -> bool:
    """Whether to stop now (call at the same points on every process)."""
    self._calls += 1
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(self._calls)
    return self._flag

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self._flag = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(state: steps.TrainState, eval_step, config, mesh,
             preemption: _Preemption | None = None) -> dict | None:
  """Top-1, top-5 and loss of the raw and EMA weights on the eval split.

  Returns None when `preemption` asks to stop, checked after every batch.
  """
  start = time.time()
  totals = None
  for batch in data.eval_pass(config):
    sums = eval_step(state, parallel.shard_batch(batch, mesh))
    if preemption is not None and preemption.requested():
      logging.warning("preempted during the evaluation at step %d",
                      int(state.step))
      return None
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  results = {"eval_examples": count,
             "eval_images_per_sec": count / (time.time() - start)}
  for prefix in ("", "ema_"):
    for name in ("top1", "top5", "loss"):
      results[f"eval_{prefix}{name}"] = float(totals[prefix + name]) / count
  return results


def _log_eval(step: int, results: dict, writer: MetricWriter) -> None:
  writer.write(step, results)
  logging.info(
      "eval at step %d on %d examples: top-1 %.4f (EMA %.4f), top-5 %.4f "
      "(EMA %.4f), loss %.4f (EMA %.4f), %.0f img/s", step,
      results["eval_examples"], results["eval_top1"], results["eval_ema_top1"],
      results["eval_top5"], results["eval_ema_top5"], results["eval_loss"],
      results["eval_ema_loss"], results["eval_images_per_sec"])


def _restore_or_init(config, ckpt, abstract, init_fn, train_iter, optimizer,
                     mesh, mode, workdir) -> steps.TrainState:
  """The workdir's newest checkpoint, else `init_from`, else a fresh init."""
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    state, data_state = restored
    if train_iter is not None:
      train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory,
                 int(state.step))
    return state
  if config.init_from:
    state = init_fn(jax.random.PRNGKey(config.seed))
    loaded = _load_init_from(config.init_from, abstract, state)
    fields = ("params", "ema_params", "model_state", "ema_model_state")
    state = state._replace(**{field: parallel.replicate(tree, mesh)
                              for field, tree in zip(fields, loaded)})
    logging.info("initialised weights from %s", config.init_from)
    return state._replace(opt_state=jax.jit(optimizer.init)(state.params))
  if mode == "eval":
    raise ValueError(f"nothing to evaluate: no checkpoint in {workdir} and "
                     "no config.init_from")
  return init_fn(jax.random.PRNGKey(config.seed))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "train") -> dict:
  """Trains and/or evaluates as configured; returns the final metrics.

  Args:
    config: an experiment config (see `nfnets.training.experiment_config.base_config`).
    workdir: where checkpoints, metrics.jsonl and TensorBoard files go.
    mode: 'train', 'eval' (the workdir's latest checkpoint, or
      `config.init_from`) or 'train_eval' (train with periodic evaluation).

  Returns:
    The last logged training metrics and the final evaluation results.
  """
  if mode not in experiment_config.MODES:
    raise ValueError(f"unknown mode {mode!r}; valid: "
                     f"{', '.join(experiment_config.MODES)}")
  experiment_config.validate(config)
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh, "batch_size")
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  if config.batch_size // mesh.size % config.accumulation_steps:
    raise ValueError(
        f"batch_size {config.batch_size} on {mesh.size} devices is "
        f"{config.batch_size // mesh.size} per device, not divisible into "
        f"accumulation_steps={config.accumulation_steps} micro-batches")
  if config.init_from and not os.path.exists(config.init_from):
    raise ValueError(f"init_from: {config.init_from} does not exist")
  workdir = prepare_workdir(workdir)

  model = models.build_model(config.model.name,
                             num_classes=config.dataset.num_classes,
                             **config.model.kwargs)
  # Evaluation reads no training data (an image folder's listing checks every
  # file); its schedule only shapes the optimizer state to restore into.
  train_iter = None if mode == "eval" else data.train_iterator(config)
  num_examples = train_iter.num_examples if train_iter else config.batch_size
  total_steps = optim.training_steps(config, num_examples)
  steps_per_epoch = num_examples / config.batch_size
  schedule = optim.learning_rate_schedule(config, total_steps, steps_per_epoch)
  optimizer = optim.make_optimizer(config, schedule)
  image_shape = (config.dataset.image_size, config.dataset.image_size, 3)
  replicated = parallel.replicated_sharding(mesh)
  init_fn = steps.make_init(model, optimizer, image_shape, mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed)))

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 config.checkpoint.max_to_keep,
                                 config.checkpoint.async_save)
  writer = None
  # SIGTERM (preemption) is honoured from here to the end: after the train
  # step or eval batch it arrives in, with a checkpoint of the last step.
  preemption = _Preemption()
  try:
    state = _restore_or_init(config, ckpt, abstract, init_fn, train_iter,
                             optimizer, mesh, mode, workdir)
    writer = MetricWriter(workdir)
    eval_step = steps.make_eval_step(model, config, mesh)
    if mode == "eval":
      results = evaluate(state, eval_step, config, mesh, preemption)
      if results is None:
        return {"preempted": int(state.step)}
      _log_eval(int(state.step), results, writer)
      return results
    state, results = _train_loop(config, state, train_iter, total_steps,
                                 steps.make_train_step(
                                     model, optimizer, schedule, config, mesh,
                                     data.device_augment(config)),
                                 ckpt, writer, mesh, eval_step, mode,
                                 preemption)
    if "preempted" in results:
      return results
    eval_results = evaluate(state, eval_step, config, mesh, preemption)
    if eval_results is None:
      # The last step is saved; a restart evaluates it again.
      ckpt.wait()
      return {**results, "preempted": int(state.step)}
    _log_eval(int(state.step), eval_results, writer)
    results.update(eval_results)
    if jax.process_index() == 0:
      # Marks a finished run (the sweep launcher skips these).
      with open(os.path.join(workdir, "done.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results
  finally:
    preemption.restore()
    ckpt.close()
    if writer is not None:
      writer.close()


def _train_loop(config, state, train_iter, total_steps, train_step, ckpt,
                writer, mesh, eval_step, mode, preemption):
  """Runs steps to `total_steps`; returns the state and the last metrics."""
  step = int(state.step)
  batch_size = config.batch_size
  logging.info("training %s from step %d to %d (%d devices, batch %d)",
               config.model.name, step, total_steps, mesh.size, batch_size)
  pending, results = [], {}
  first_step, last_step = step, step
  last_time = run_start = time.time()
  # The data position after each step not yet checked for NaNs, so that the
  # last good state is saved with the position it was trained to.
  positions = {step: train_iter.get_state()}

  def check_finite():
    bad = int(state.nonfinite_step)
    if bad < 0:
      return
    # Saved as it was before the bad step (whose update was dropped), so
    # that a resumed run trains it again.
    cleared = state._replace(
        nonfinite_step=jnp.full_like(state.nonfinite_step, -1))
    ckpt.save(bad, cleared, positions[bad])
    ckpt.wait()
    saved = (f"stopped, the last good state (step {bad}) is saved in "
             f"{ckpt.directory}")
    metrics = jax.device_get(pending[bad - last_step])
    if np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]):
      raise LossSpikeError(
          f"the loss spiked at step {bad}: {float(metrics['loss']):.4g}, over "
          f"loss_spike.factor={config.loss_spike.factor:g} times its running "
          f"average {float(metrics['loss_average']):.4g}; {saved}; lower the "
          "learning rate or check the data")
    raise NonFiniteLossError(
        f"loss or gradient became NaN/inf at step {bad}; {saved}; lower the "
        "learning rate or check the data")

  def stop():
    check_finite()
    ckpt.save(step, state, train_iter.get_state())
    ckpt.wait()
    logging.warning("preempted: checkpoint saved at step %d", step)
    results["preempted"] = step

  while step < total_steps:
    batch = parallel.shard_batch(next(train_iter), mesh)
    state, metrics = train_step(state, batch)
    step += 1
    positions[step] = train_iter.get_state()
    pending.append(metrics)
    if step % config.log_every_steps == 0 or step == total_steps:
      check_finite()
      positions = {step: positions[step]}
      fetched = jax.device_get(pending)
      pending = []
      now = time.time()
      results = {k: float(np.mean([m[k] for m in fetched]))
                 for k in fetched[0]}
      results["images_per_sec"] = (step - last_step) * batch_size / (
          now - last_time)
      writer.write(step, results)
      eta = (total_steps - step) * (now - run_start) / (step - first_step)
      if jax.process_index() == 0:
        logging.info("step %d/%d: loss %.4f, train acc %.3f, lr %.4g, "
                     "%.0f img/s, ETA %.0fs", step, total_steps,
                     results["loss"], results["train_accuracy"],
                     results["learning_rate"], results["images_per_sec"],
                     eta)
      last_time, last_step = now, step
    if step % config.checkpoint.every_steps == 0 or step == total_steps:
      check_finite()
      ckpt.save(step, state, train_iter.get_state())
    if (mode == "train_eval" and config.eval_every_steps and
        step % config.eval_every_steps == 0 and step < total_steps):
      eval_results = evaluate(state, eval_step, config, mesh, preemption)
      if eval_results is None:
        stop()
        break
      _log_eval(step, eval_results, writer)
    if preemption.requested():
      stop()
      break
  return state, results
