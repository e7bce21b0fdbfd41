"""The F0 optimizer against the released `SGD_AGC` and its parameter groups.

DeepMind's `experiment_nfnets.py` (`Experiment._make_opt`) splits the Haiku
params into three groups for `optim.SGD_AGC`: gains and biases (clipped, not
decayed), the classifier weight (decayed, not clipped) and every other
weight (both). Here that update is written again in float64 numpy from the
released definitions and compared with two steps of `optim.make_optimizer`
on parameters of F0's real shapes (71.5M of them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model_helpers import fast_jit
from nfnets import models
from nfnets.ops import switch
from nfnets.training import optim

import configs.nfnet as nfnet_config  # pylint: disable=g-bad-import-order

SEED = 16
# The released hyperparameters (`experiment_nfnets.py` get_config), not read
# from the project's config, so that a drift there is caught here.
MOMENTUM = 0.9
WEIGHT_DECAY = 2e-5
CLIPPING = 0.01
EPS = 1e-3
LR = 0.1 * 4096 / 256  # the peak: lr * batch / 256, held constant here

CLASSIFIER = "NFNet/~/linear"
SE_LINEAR = "NFNet/~/nf_block/~/squeeze_excite/~/linear"
SKIP_GAIN_BLOCK = "NFNet/~/nf_block_1"
# Ratios ||grad unit|| / (clipping * ||param unit||*) are drawn at least this
# far (as a log, 16%) from 1, so float32 and float64 never disagree on a
# clip; both gradients are drawn against the initial params, and the first
# step moves no clipped unit's norm by more than ~6%.
_LOG_MARGIN = 0.15


def _unitwise_norm(x):
  """The released `optim.unitwise_norm` (HWIO / IO units), in numpy."""
  if len(np.squeeze(x).shape) <= 1:  # scalars and vectors: one unit
    axis, keepdims = None, False
  elif x.ndim in (2, 3):  # linear layers, IO
    axis, keepdims = 0, True
  elif x.ndim == 4:  # conv kernels, HWIO
    axis, keepdims = (0, 1, 2), True
  else:
    raise ValueError(f"unexpected shape {x.shape}")
  return np.sum(x ** 2, axis=axis, keepdims=keepdims) ** 0.5


def _released_group(module, name):
  """(weight_decay, clipping) of a leaf: `_make_opt`'s `pred_gb`, `pred_fc`."""
  if name in ("scale", "offset", "b") or "gain" in name or "bias" in name:
    return None, CLIPPING  # gains_biases
  if "linear" in module and "squeeze_excite" not in module:
    return WEIGHT_DECAY, None  # fc_weights
  return WEIGHT_DECAY, CLIPPING  # weights


def _released_clip(param, grad, clipping):
  """The AGC part of `SGD_AGC.update_param`: (clipped grad, unit flags)."""
  param_norm = np.maximum(_unitwise_norm(param), EPS)
  grad_norm = _unitwise_norm(grad)
  max_norm = param_norm * clipping
  trigger = grad_norm > max_norm
  return np.where(trigger, grad * (max_norm / np.maximum(grad_norm, 1e-6)),
                  grad), trigger


def _released_update(param, grad, buf, weight_decay, clipping):
  """`SGD_AGC.update_param` then `SGD.update_param` for one leaf.

  Args:
    param: the parameter (float64).
    grad: its gradient (float64).
    buf: its momentum buffer (float64).
    weight_decay: the group's weight decay, or None.
    clipping: the group's AGC clipping, or None.

  Returns:
    (new param, new buffer, per-unit clip flags or None when not clipped).
  """
  trigger = None
  if clipping is not None:
    grad, trigger = _released_clip(param, grad, clipping)
  if weight_decay is not None:
    grad = grad + param * weight_decay
  buf = MOMENTUM * buf + grad  # dampening 0
  grad = grad + MOMENTUM * buf  # Nesterov
  return param - LR * grad, buf, trigger


def _f0_params(rng):
  """F0's params tree, filled with values of trained-network scales."""
  model = models.build_model("nfnet_f0", num_classes=1000)
  shapes, _ = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, is_training=True),
      jax.ShapeDtypeStruct((1, 192, 192, 3), jnp.float32))
  skip_gains = iter([0.0, 5e-4, 0.05, 0.3] * 3)  # 0 is their init value
  params = {}
  for module, leaves in shapes.items():
    params[module] = {}
    for name, leaf in leaves.items():
      shape = leaf.shape
      if name == "skip_gain":
        value = np.full(shape, next(skip_gains))
      elif name == "gain":
        value = 1 + 0.2 * rng.standard_normal(shape, np.float32)
      elif name in ("bias", "b"):
        value = 0.02 * rng.standard_normal(shape, np.float32)
      elif module == CLASSIFIER:
        value = 0.01 * rng.standard_normal(shape, np.float32)
      else:
        value = (rng.standard_normal(shape, np.float32) /
                 np.sqrt(np.prod(shape[:-1])))
      params[module][name] = value.astype(np.float32, copy=False)
  params[SKIP_GAIN_BLOCK]["skip_gain"] = np.full((), 5e-4, np.float32)
  return params


def _gradient(rng, params, clipped=()):
  """A gradient whose units sit clearly above or below the clip threshold.

  Each unit (as the released code counts them) gets a random direction and
  the norm `r * CLIPPING * max(||param unit||, EPS)`, with log r uniform in
  +-[_LOG_MARGIN, 2.3]: above 1, AGC clips it. The classifier weight gets
  such units too, to show that they pass unclipped.

  Args:
    rng: a numpy Generator.
    params: the params tree (float32 numpy).
    clipped: (module, name) leaves whose every unit gets r > 1.

  Returns:
    A float32 tree of the params' structure.
  """
  grads = {}
  for module, leaves in params.items():
    grads[module] = {}
    for name, param in leaves.items():
      p_norm = np.maximum(_unitwise_norm(param), EPS)
      log_r = rng.uniform(_LOG_MARGIN, 2.3, np.shape(p_norm))
      if (module, name) not in clipped:
        log_r *= rng.choice([-1.0, 1.0], np.shape(p_norm))
      direction = rng.standard_normal(param.shape, np.float32)
      scale = (np.exp(log_r) * CLIPPING * p_norm /
               _unitwise_norm(direction))
      grads[module][name] = (direction * scale).astype(np.float32)
  return grads


def _project_steps(params, grads, fast_paths):
  """The project's F0 optimizer, jitted once: the params after each step."""
  config = nfnet_config.get_config()
  config.fast_paths = fast_paths
  optimizer = optim.make_optimizer(config, lambda step: LR)
  traces = []

  def step(params, opt_state, grads):
    traces.append(1)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with switch.fast_paths(config.fast_paths):  # as the trainer traces it
    # (Compiled with `fast_jit`'s options: the fast paths' update over F0's
    # hundreds of leaves compiles 2-3x faster; the same values.)
    step = fast_jit(step)
    params = jax.device_put(params)
    opt_state = optimizer.init(params)
    after = []
    for grad in grads:
      params, opt_state = step(params, opt_state, grad)
      after.append(jax.device_get(params))
  assert len(traces) == 1
  return after


def _released_steps(params, grads):
  """The released optimizer over `grads`, leaf by leaf (float64).

  Args:
    params: the initial params tree.
    grads: a list of gradient trees, one per step.

  Yields:
    (module, name, the param after each step, the clip flags of each step:
    None where the leaf's group does not clip).
  """
  for module, leaves in params.items():
    for name, param in leaves.items():
      weight_decay, clipping = _released_group(module, name)
      p, buf = param.astype(np.float64), np.zeros(param.shape)
      after, flags = [], []
      for grad in grads:
        p, buf, trigger = _released_update(
            p, grad[module][name].astype(np.float64), buf, weight_decay,
            clipping)
        after.append(p)
        flags.append(trigger)
      yield module, name, after, flags


@pytest.fixture(scope="module")
def f0_steps():
  """F0 params, two gradients and the project's two steps over them."""
  print(f"seed {SEED}")
  rng = np.random.default_rng(SEED)
  params = _f0_params(rng)
  # The leaves test_named_f0_leaves_... reads are clipped at step 1.
  forced = ((CLASSIFIER, "w"), (CLASSIFIER, "b"), (SE_LINEAR, "w"),
            (SKIP_GAIN_BLOCK, "skip_gain"))
  grads = [_gradient(rng, params, forced), _gradient(rng, params)]
  return dict(params=params, grads=grads,
              project=_project_steps(params, grads, fast_paths=True))


def _mismatch(got, expected):
  """None, or the largest errors of `got` (float32) against `expected`."""
  got = np.asarray(got, np.float64)
  # A float32 param holds ~7 digits: rtol 1e-5, and an atol of ~10 ulps of
  # the leaf's largest value for elements that cancel to ~0.
  atol = 1e-6 * np.max(np.abs(expected))
  err = np.abs(got - expected)
  if np.all(err <= 1e-5 * np.abs(expected) + atol):
    return None
  rel = np.max(err / np.maximum(np.abs(expected), atol))
  return f"max abs err {err.max():.3g}, max rel err {rel:.3g}"


@pytest.mark.parametrize("fast_paths", [True, False])
def test_two_f0_steps_equal_the_released_sgd_agc(f0_steps, fast_paths):
  """Both steps (momentum and Nesterov in the second), every leaf."""
  params, grads = f0_steps["params"], f0_steps["grads"]
  project = f0_steps["project"]
  if not fast_paths:  # the plain twin of the AGC norms
    project = _project_steps(params, grads, fast_paths=False)
  bad = []
  # Clip flags per step and group that clips: the data must take both
  # branches of AGC in each, or the equality would not test the clip.
  flags = {(s, group): [] for s in (0, 1)
           for group in ("gains_biases", "weights")}
  for module, name, after, triggers in _released_steps(params, grads):
    for s, (expected, trigger) in enumerate(zip(after, triggers)):
      error = _mismatch(project[s][module][name], expected)
      if error:
        bad.append(f"step {s + 1} {module} {name}: {error}")
      if trigger is not None:
        group = ("gains_biases" if _released_group(module, name)[0] is None
                 else "weights")
        flags[s, group].append(np.ravel(trigger))
  assert not bad, "\n".join(bad)
  for key, leaves in flags.items():
    clipped = np.concatenate(leaves)
    assert 0 < clipped.sum() < clipped.size, key


def _rule(f0_steps, module, name):
  """Which (clipped, decayed) rule explains the project's first update.

  From zero momentum the first step is `p - LR * (1 + MOMENTUM) * g'`; each
  of the four candidates for g' (the raw or the AGC-clipped gradient, with
  or without `WEIGHT_DECAY * p`) is compared with the one the project took.

  Returns:
    (clipped, decayed, the effective gradient g').
  """
  p0 = f0_steps["params"][module][name].astype(np.float64)
  p1 = np.asarray(f0_steps["project"][0][module][name], np.float64)
  g = f0_steps["grads"][0][module][name].astype(np.float64)
  effective = (p0 - p1) / (LR * (1 + MOMENTUM))
  clipped, trigger = _released_clip(p0, g, CLIPPING)
  assert np.any(trigger)  # else clipped and raw candidates are one
  residuals = {}
  for clip in (False, True):
    for decay in (False, True):
      candidate = ((clipped if clip else g) +
                   (WEIGHT_DECAY * p0 if decay else 0.0))
      residuals[clip, decay] = np.linalg.norm(effective - candidate)
  best, second = sorted(residuals, key=residuals.get)[:2]
  # The decay term is ~1e-3 of an update here, far above float32 rounding.
  assert residuals[best] < 0.05 * residuals[second], residuals
  return best + (effective,)


def test_named_f0_leaves_are_clipped_and_decayed_as_released(f0_steps):
  """The leaves the paper's text leaves ambiguous, checked one by one."""
  # Classifier weight: decayed, never clipped (though units exceed the bound).
  assert _rule(f0_steps, CLASSIFIER, "w")[:2] == (False, True)
  # Classifier bias: a bias, so clipped and not decayed.
  assert _rule(f0_steps, CLASSIFIER, "b")[:2] == (True, False)
  # SE MLP weight: clipped and decayed, like a conv weight.
  assert _rule(f0_steps, SE_LINEAR, "w")[:2] == (True, True)
  # skip_gain: a scalar, clipped and not decayed; its norm floors at EPS.
  clip, decay, effective = _rule(f0_steps, SKIP_GAIN_BLOCK, "skip_gain")
  assert (clip, decay) == (True, False)
  # Its value, 5e-4, is below EPS: the clipped step is CLIPPING * EPS, not
  # CLIPPING * 5e-4.
  assert 0 < f0_steps["params"][SKIP_GAIN_BLOCK]["skip_gain"] < EPS
  assert abs(float(effective)) == pytest.approx(CLIPPING * EPS, rel=1e-4)
