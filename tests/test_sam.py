"""Tests for nfnets.sam (SAM: Foret et al. 2021; as in Brock et al. 2021)."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from model_helpers import fast_jit
from nfnets import agc
from nfnets import models
from nfnets import sam

RHO = 0.05


def _tree_rel_err(a, b):
  """||a - b|| / ||b|| over a whole tree, in float64."""
  diff = sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64))
                    ** 2) for x, y in zip(jax.tree.leaves(a),
                                          jax.tree.leaves(b)))
  ref = sum(np.sum(np.asarray(y, np.float64) ** 2) for y in jax.tree.leaves(b))
  return float(np.sqrt(diff / ref))


def _hand_sam(grad_fn, params, rho):
  """Step-by-step SAM: gradient, global-norm perturbation, gradient again.

  Args:
    grad_fn: `params -> ((loss, aux), grads)`, e.g. a jitted
      `jax.value_and_grad(loss_fn, has_aux=True)`; called at w, then w + e.
    params: the point w.
    rho: the SAM radius.

  Returns:
    `(value_at_w, plain_grad, sam_grad)`.
  """
  value, g = grad_fn(params)
  # In float64 numpy: eager jnp ops would compile a small program for each
  # leaf shape (seconds in all for a network).
  g64 = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
  norm = np.sqrt(sum(np.sum(x ** 2) for x in g64))
  leaves, treedef = jax.tree.flatten(params)
  perturbed = treedef.unflatten([
      (np.asarray(w, np.float64) + rho * gw / (norm + 1e-12)).astype(w.dtype)
      for w, gw in zip(leaves, g64, strict=True)])
  return value, g, grad_fn(perturbed)[1]


def test_quadratic_matches_hand_computation_and_sgd_step():
  a = {"x": jnp.array([1.0, 2.0, 3.0]), "y": jnp.array([[0.5, 4.0]])}
  w_star = {"x": jnp.array([0.1, -0.2, 0.3]), "y": jnp.array([[1.0, -1.0]])}
  w = {"x": jnp.array([1.0, 1.0, -1.0]), "y": jnp.array([[0.0, 2.0]])}
  rho, lr = 0.3, 0.1

  def loss_fn(p):
    return sum(0.5 * jnp.sum(ai * (pi - si) ** 2) for ai, pi, si in zip(
        jax.tree.leaves(a), jax.tree.leaves(p), jax.tree.leaves(w_star)))

  an, wn, sn = (jax.tree.map(np.asarray, t) for t in (a, w, w_star))
  g = {k: an[k] * (wn[k] - sn[k]) for k in an}
  g_norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
  expected = {k: an[k] * (wn[k] + rho * g[k] / g_norm - sn[k]) for k in an}

  loss, grads = sam.sam_gradient(loss_fn, w, rho)
  np.testing.assert_allclose(loss, loss_fn(w), rtol=1e-6)
  for k in an:
    np.testing.assert_allclose(grads[k], expected[k], rtol=1e-6, atol=1e-6)

  opt = optax.sgd(lr)
  updates, _ = opt.update(grads, opt.init(w), w)
  new_w = optax.apply_updates(w, updates)
  for k in an:
    np.testing.assert_allclose(new_w[k], wn[k] - lr * expected[k],
                               rtol=1e-6, atol=1e-6)

  # At the minimum g = 0: eps keeps e = 0 finite, so the SAM gradient is 0.
  _, grads = sam.sam_gradient(loss_fn, w_star, rho)
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


@pytest.mark.parametrize("has_aux", [False, True])
def test_rho_zero_is_bit_equal_to_value_and_grad(has_aux):
  params = {"w": jax.random.normal(jax.random.key(0), (4, 3)),
            "b": jnp.arange(3.0)}
  x = jax.random.normal(jax.random.key(1), (5, 4))

  def loss_fn(p):
    out = jnp.tanh(x @ p["w"] + p["b"])
    loss = jnp.mean(out ** 2)
    return (loss, out) if has_aux else loss

  got = sam.sam_gradient(loss_fn, params, 0.0, has_aux=has_aux)
  want = jax.value_and_grad(loss_fn, has_aux=has_aux)(params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


def test_tiny_nfnet_matches_hand_computation_and_composes_with_agc():
  model = models.build_model(
      "nfnet_f0", num_classes=10, width_multiplier=0.125, group_width=16,
      depths=(1, 1, 1, 1), drop_path_rate=0.0, dropout_rate=0.0)
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10
  # Jitted: an eager Haiku init of even this tiny net takes tens of seconds.
  params, state = fast_jit(functools.partial(model.init, is_training=True))(
      jax.random.key(1), images)

  def loss_fn(p):
    logits, _ = model.apply(p, state, None, images, is_training=True)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, labels))
    return loss, logits

  optimizer = optax.chain(
      agc.adaptive_grad_clip(0.01, mask=agc.classifier_mask),
      optax.sgd(0.1, momentum=0.9))

  @fast_jit
  def step(p, opt_state):
    (loss, logits), grads = sam.sam_gradient(loss_fn, p, RHO, has_aux=True)
    # AGC clips relative to the original params p, not the probe p + e.
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), loss, logits, grads

  new_params, loss, logits, grads = step(params, optimizer.init(params))
  # One compiled gradient, called at w and at w + e (half a SAM compile).
  (want_loss, want_logits), plain, want = _hand_sam(
      fast_jit(jax.value_and_grad(loss_fn, has_aux=True)), params, RHO)

  assert _tree_rel_err(grads, want) < 1e-5
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)  # value is at w
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
  # SAM differs from the plain gradient (else the test would prove nothing).
  assert _tree_rel_err(grads, plain) > 1e-3
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new_params))
  assert _tree_rel_err(new_params, params) > 0


def _mlp_loss(params, x, y):
  """Mean cross-entropy of a one-hidden-layer tanh MLP."""
  logits = jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


@pytest.mark.parametrize("sync_ascent", [True, False])
def test_shard_map_sync_and_unsync_ascent(sync_ascent):
  devices = jax.devices()
  n = len(devices)
  mesh = Mesh(np.asarray(devices), ("data",))
  keys = jax.random.split(jax.random.key(2), 4)
  params = {"w1": jax.random.normal(keys[0], (6, 8)),
            "w2": jax.random.normal(keys[1], (8, 5)) * 0.5,
            "b": jnp.zeros((5,))}
  x = jax.random.normal(keys[2], (2 * n, 6))
  y = jax.random.randint(keys[3], (2 * n,), 0, 5)

  def per_device(p, xs, ys):
    loss, grads = sam.sam_gradient(
        functools.partial(_mlp_loss, x=xs, y=ys), p, RHO,
        axis_name="data", sync_ascent=sync_ascent)
    return lax.pmean(loss, "data"), lax.pmean(grads, "data")

  mapped = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
      out_specs=(P(), P()), check_vma=False))
  loss, grads = mapped(params, x, y)

  single = jax.jit(lambda p, xs, ys: sam.sam_gradient(
      functools.partial(_mlp_loss, x=xs, y=ys), p, RHO))
  full_loss, full_grads = single(params, x, y)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  # Per-shard SAM, one shard at a time, then averaged: the unsync reference.
  shard_grads = [single(params, xs, ys)[1] for xs, ys in
                 zip(jnp.split(x, n), jnp.split(y, n))]
  mean_shard = jax.tree.map(lambda *g: sum(g) / n, *shard_grads)
  assert _tree_rel_err(mean_shard, full_grads) > 1e-3  # they do differ

  if sync_ascent:
    # One e from the full-batch gradient; the mean of the local gradients at
    # w + e is the full-batch gradient there (equal shards, mean loss).
    assert _tree_rel_err(grads, full_grads) < 1e-5
  else:
    assert _tree_rel_err(grads, mean_shard) < 1e-5
    assert _tree_rel_err(grads, full_grads) > 1e-3


@pytest.mark.parametrize("rho", [-0.1, float("nan")])
def test_invalid_rho_raises(rho):
  with pytest.raises(ValueError, match="rho"):
    sam.sam_gradient(lambda p: jnp.sum(p ** 2), jnp.ones(3), rho)
