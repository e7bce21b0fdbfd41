"""The training state and the data-parallel train and eval steps.

The steps are written per device, pmap-style: the batch is this device's
slice, gradients and metrics are averaged with `lax.pmean` over the `'data'`
axis. `jax.shard_map` maps them over a mesh of every device of every process
with `check_vma=False` (pmap semantics: local gradients, then `pmean`); with
the default `check_vma=True` the gradient of a replicated input would already
be summed over devices and the `pmean` would scale the update by the device
count. Both are traced with the fast paths of `nfnets.ops` on or off as
`config.fast_paths` says. The loop that drives them is
`nfnets.training.loop.train_and_evaluate`.
"""

import functools
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import jmp
import ml_collections
import numpy as np
import optax

from nfnets import sam
from nfnets.ops import layout
from nfnets.ops import norms
from nfnets.ops import switch
from nfnets.training import optim
from nfnets.training import parallel


# `fold_in(state.rng, AUGMENT_STREAM)` keys the on-device augmentation; the
# model's keys fold in the step, which never reaches this value.
AUGMENT_STREAM = np.uint32(0xFFFFFFFF)


class TrainState(NamedTuple):
  """Everything a run needs to continue exactly; replicated on all devices.

  `ema_params` and `ema_model_state` are exponential moving averages of the
  parameters and of the model state (a BN-ResNet's batch statistics), as in
  the released code (`experiment.py`, `_train_fn`); the EMA evaluation uses
  both. `nonfinite_step` is -1 until a step produces a non-finite loss or
  gradient, or a loss spike (`config.loss_spike`); that step's update is
  dropped and every later step leaves the state as it is, so the last good
  state can be saved without a per-step host sync. `loss_average` holds the
  running average of the good steps' losses that the spike guard compares
  with: {'sum': EMA of the loss from 0, 'weight': EMA of 1 from 0}, whose
  ratio is the bias-corrected average.
  """
  step: jax.Array
  params: hk.Params
  model_state: hk.State
  opt_state: optax.OptState
  ema_params: hk.Params
  rng: jax.Array
  nonfinite_step: jax.Array
  ema_model_state: hk.State
  loss_average: dict[str, jax.Array]


def precision_policy(precision: str) -> jmp.Policy:
  """float32 master weights; compute in `precision`; float32 outputs."""
  return jmp.get_policy(f"params=float32,compute={precision},output=float32")


def init_state(model: hk.TransformedWithState,
               optimizer: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, ...]) -> TrainState:
  """Fresh parameters, optimizer state and EMA (a pure, jittable function)."""
  init_rng, state_rng = jax.random.split(rng)
  images = jnp.zeros((1, *image_shape), jnp.float32)
  params, model_state = model.init(init_rng, images, is_training=True)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
      opt_state=optimizer.init(params), ema_params=params, rng=state_rng,
      nonfinite_step=jnp.full((), -1, jnp.int32), ema_model_state=model_state,
      loss_average=initial_loss_average())


def initial_loss_average() -> dict[str, jax.Array]:
  return {"sum": jnp.zeros((), jnp.float32),
          "weight": jnp.zeros((), jnp.float32)}


def loss_spike(config: ml_collections.ConfigDict, average: dict[str, Any],
               loss: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Whether `loss` spikes over `average`, and the average updated with it.

  The average is an EMA with decay `1 - 1 / window`; the guard (off for
  `factor` 0) starts once that EMA's weight reaches `1 - decay**window`
  (about 63%: `window` steps averaged).

  Returns:
    (spike: a bool scalar, the updated average).
  """
  window = config.loss_spike.window
  decay = 1.0 - 1.0 / window
  updated = {"sum": decay * average["sum"] + (1.0 - decay) * loss,
             "weight": decay * average["weight"] + (1.0 - decay)}
  factor = config.loss_spike.factor
  if not factor:
    return jnp.zeros((), bool), updated
  ready = average["weight"] >= 1.0 - decay ** window
  mean = average["sum"] / jnp.maximum(average["weight"], 1e-12)
  return ready & (loss > factor * mean), updated


def make_init(model: hk.TransformedWithState,
              optimizer: optax.GradientTransformation,
              image_shape: tuple[int, ...],
              mesh: Mesh) -> Callable[[jax.Array], TrainState]:
  """`init_state` jitted to a state replicated over the mesh.

  It runs once, so it is compiled without backend optimization: that takes
  a third of the time on CPUs (the many RNG calls are slow to optimize).
  """
  return jax.jit(
      lambda rng: init_state(model, optimizer, rng, image_shape),
      out_shardings=parallel.replicated_sharding(mesh),
      compiler_options={"xla_backend_optimization_level": 0})


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """The EMA decay, optionally warmed up as min(decay, (1 + t) / (10 + t))."""
  decay = jnp.asarray(config.ema.decay, jnp.float32)
  if config.ema.warmup:
    t = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return decay


def ema_update(decay: jax.Array, average: Any, value: Any) -> Any:
  """`decay * average + (1 - decay) * value` for float leaves.

  Integer leaves (e.g. a batch-norm update counter) take the new value.
  """

  def update(a, v):
    if not jnp.issubdtype(v.dtype, jnp.floating):
      return v
    return (decay * a + (1.0 - decay) * v).astype(v.dtype)

  return jax.tree.map(update, average, value)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float) -> jax.Array:
  """Per-example softmax cross-entropy on int or soft labels, smoothed."""
  if labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  labels = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def _traced_with_fast_paths(per_device_step: Callable[..., Any],
                            enabled: bool) -> Callable[..., Any]:
  """`per_device_step` traced with the fast paths on or off (`nfnets.ops`)."""

  @functools.wraps(per_device_step)
  def traced(*args):
    with switch.fast_paths(enabled):
      return per_device_step(*args)

  return traced


def make_train_step(model: hk.TransformedWithState,
                    optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    config: ml_collections.ConfigDict,
                    mesh: Mesh,
                    augment: Callable[..., Any] | None = None
                    ) -> Callable[[TrainState, Any], Any]:
  """Returns the jitted, state-donating `train_step(state, batch)`.

  With `augment` (`nfnets.augment.batch.DeviceAugment`, from
  `nfnets.data.device_augment`), each device first turns its slice of uint8
  crops into the normalised, mixed and RandAugment'ed examples, with keys
  from the state's RNG, the step and each example's index in the global
  batch (the same on any number of devices, and after a resume).

  With `config.accumulation_steps = k > 1`, each device's slice of the batch
  is cut into k micro-batches whose gradients are averaged before the
  device mean, AGC, weight decay, the optimizer and the EMA see them: one
  optimizer step of the whole batch, with one micro-batch's activations in
  memory. Equal to the step without accumulation up to float rounding,
  except for what depends on the micro-batch itself: batch-norm statistics
  (a BN-ResNet's) and SAM's ascent step, which is taken per micro-batch
  (Foret et al.'s m-sharpness with m the micro-batch).

  Args:
    model: the transformed model.
    optimizer: from `optim.make_optimizer`.
    schedule: the learning-rate schedule (for logging).
    config: the experiment config.
    mesh: the data mesh; `batch` is sharded over it, the state replicated.
    augment: the on-device augmentation, or None (the batch is ready).

  Returns:
    `train_step(state, batch) -> (state, metrics)`, metrics a dict of
    replicated float32 scalars.
  """
  policy = precision_policy(config.precision)
  num_classes = config.dataset.num_classes
  accumulation = config.accumulation_steps
  stop_frozen = optim.stop_frozen_gradients(config)

  def micro_step(params, model_state, batch, rng):
    """Loss, accuracy, gradient and new model state of one (micro-)batch."""

    def loss_fn(params):
      logits, new_model_state = model.apply(
          policy.cast_to_compute(stop_frozen(params)), model_state, rng,
          policy.cast_to_compute(batch["images"]), is_training=True)
      logits = policy.cast_to_output(logits)
      loss = jnp.mean(cross_entropy(logits, batch["labels"], num_classes,
                                    config.label_smoothing))
      return loss, (logits, new_model_state)

    # SAM with rho = 0 is exactly jax.value_and_grad.
    (loss, (logits, model_state)), grads = sam.sam_gradient(
        loss_fn, params, config.optimizer.sam_rho,
        axis_name=parallel.AXIS, sync_ascent=config.optimizer.sam_sync,
        has_aux=True)
    labels = batch["labels"]
    if labels.ndim > 1:
      labels = jnp.argmax(labels, -1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, accuracy, grads, model_state

  def accumulated_step(params, model_state, batch, rng):
    """`micro_step` averaged over `accumulation` slices of the batch.

    A scan keeps one micro-batch's activations alive at a time; the model
    state (batch-norm statistics) passes from one micro-batch to the next.
    """
    micro = jax.tree.map(
        lambda x: x.reshape(accumulation, x.shape[0] // accumulation,
                            *x.shape[1:]), batch)

    def body(carry, xs):
      model_state, sums = carry
      micro_batch, index = xs
      loss, accuracy, grads, model_state = micro_step(
          params, model_state, micro_batch, jax.random.fold_in(rng, index))
      sums = jax.tree.map(jnp.add, sums, (loss, accuracy, grads))
      return (model_state, sums), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, params))
    (model_state, sums), _ = lax.scan(
        body, (model_state, zeros), (micro, jnp.arange(accumulation)))
    loss, accuracy, grads = jax.tree.map(lambda x: x / accumulation, sums)
    return loss, accuracy, grads, model_state

  def per_device_step(state: TrainState, batch):
    # Per-step, per-device randomness (stochastic depth, dropout) that does
    # not depend on how often the run was resumed.
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                             lax.axis_index(parallel.AXIS))
    if augment is not None:
      key = jax.random.fold_in(
          jax.random.fold_in(state.rng, AUGMENT_STREAM), state.step)
      examples = batch["images"].shape[0] // augment.crops_per_example
      images, labels = augment(
          batch["images"], batch["labels"], key,
          lax.axis_index(parallel.AXIS) * examples)
      batch = {"images": images, "labels": labels}
    step_fn = micro_step if accumulation == 1 else accumulated_step
    loss, accuracy, grads, model_state = step_fn(
        state.params, state.model_state, batch, rng)
    grads = layout.in_default_layout(lax.pmean(grads, parallel.AXIS))
    loss = lax.pmean(loss, parallel.AXIS)
    # (pmean gives float32 for integers, e.g. batch norm's EMA counter: cast
    # back, or the state's types would change after the first step.)
    model_state = jax.tree.map(
        lambda new, old: lax.pmean(new, parallel.AXIS).astype(old.dtype),
        model_state, state.model_state)
    accuracy = lax.pmean(accuracy, parallel.AXIS)

    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(config, state.step)
    ema_params = ema_update(decay, state.ema_params, params)
    ema_model_state = ema_update(decay, state.ema_model_state, model_state)
    grad_norm = norms.global_norm(grads)
    spike, loss_average = loss_spike(config, state.loss_average, loss)
    good = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~spike
    ok = good & (state.nonfinite_step < 0)
    new_state = TrainState(
        step=state.step + 1, params=params, model_state=model_state,
        opt_state=opt_state, ema_params=ema_params, rng=state.rng,
        nonfinite_step=state.nonfinite_step, ema_model_state=ema_model_state,
        loss_average=loss_average)
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state,
                             state)
    new_state = new_state._replace(nonfinite_step=jnp.where(
        (state.nonfinite_step < 0) & ~good, state.step,
        state.nonfinite_step))
    metrics = {
        "loss": loss, "train_accuracy": accuracy, "grad_norm": grad_norm,
        "agc_clipped_fraction": jnp.asarray(
            optim.agc_clipped_fraction(opt_state), jnp.float32),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "ema_decay": decay,
        # (What the spike guard compared this step's loss with.)
        "loss_average": state.loss_average["sum"] / jnp.maximum(
            state.loss_average["weight"], 1e-12),
    }
    return new_state, metrics

  mapped = jax.shard_map(
      _traced_with_fast_paths(per_device_step, config.fast_paths), mesh=mesh,
      in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()),
      check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


def make_eval_step(model: hk.TransformedWithState,
                   config: ml_collections.ConfigDict,
                   mesh: Mesh) -> Callable[[TrainState, Any], Any]:
  """Returns the jitted `eval_step(state, batch) -> sums`.

  The sums (over real examples only, `batch['mask'] == 1`, across all
  devices) are `count`, and for both the raw and the EMA weights (with the
  EMA model state) `top1`, `top5` (correct predictions) and `loss`
  (unsmoothed cross-entropy). The model computes in `config.eval_precision`
  (float32 in the released code, which casts to bfloat16 only to train).
  """
  policy = precision_policy(config.eval_precision)
  num_classes = config.dataset.num_classes
  top_k = min(5, num_classes)

  def per_device_step(state: TrainState, batch):
    mask = batch["mask"]
    labels = batch["labels"]
    sums = {"count": jnp.sum(mask)}
    for prefix, params, model_state in (
        ("", state.params, state.model_state),
        ("ema_", state.ema_params, state.ema_model_state)):
      logits, _ = model.apply(
          policy.cast_to_compute(params), model_state, None,
          policy.cast_to_compute(batch["images"]), is_training=False)
      logits = policy.cast_to_output(logits).astype(jnp.float32)
      loss = cross_entropy(logits, labels, num_classes, 0.0)
      top = lax.top_k(logits, top_k)[1]
      sums[prefix + "top1"] = jnp.sum((top[:, 0] == labels) * mask)
      sums[prefix + "top5"] = jnp.sum(
          jnp.any(top == labels[:, None], axis=-1) * mask)
      sums[prefix + "loss"] = jnp.sum(loss * mask)
    return jax.tree.map(functools.partial(lax.psum, axis_name=parallel.AXIS),
                        sums)

  mapped = jax.shard_map(
      _traced_with_fast_paths(per_device_step, config.fast_paths), mesh=mesh,
      in_specs=(P(), P(parallel.AXIS)), out_specs=P(), check_vma=False)
  return jax.jit(mapped)
