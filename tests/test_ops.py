"""`nfnets.ops`: each fast path against its plain twin, and the switch.

Both sides must give the same values and gradients; the switch must really
trace the plain side (no custom VJP, barrier or stacking left), or timing
the two (`benchmarks/benchmark.py --plain`) would compare a path with itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_helpers import find_eqns
from nfnets import agc
from nfnets import ops
from nfnets.ops import conv
from nfnets.ops import layout
from nfnets.ops import norms
from nfnets.ops import recompute
from nfnets.ops import standardize


def _both(fn, *args):
  """fn(*args) traced with the fast paths, then with the plain twins."""
  fast = fn(*args)
  with ops.fast_paths(False):
    plain = fn(*args)
  return fast, plain


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), rtol=rtol,
                               atol=atol)


def _has_custom_vjp(fn, *args) -> bool:
  return any(find_eqns(fn, name, *args)
             for name in ("custom_vjp_call", "custom_vjp_call_jaxpr"))


def test_switch_is_scoped_and_checks_its_argument():
  assert ops.fast_paths_enabled()
  with ops.fast_paths(False):
    assert not ops.fast_paths_enabled()
    with ops.fast_paths(True):
      assert ops.fast_paths_enabled()
    assert not ops.fast_paths_enabled()
  assert ops.fast_paths_enabled()
  with pytest.raises(ValueError, match="True or False"):
    with ops.fast_paths("no"):
      pass


def test_strided_grouped_conv_gradient_plain_is_xlas():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 12))

  def loss(x, kernel):
    out = conv.conv2d(x, kernel, (2, 2), 2)
    return jnp.sum(out * jnp.cos(out))

  grads = lambda x, k: jax.grad(loss, argnums=(0, 1))(x, k)
  _assert_trees_close(*_both(grads, x, kernel), rtol=1e-5, atol=1e-4)
  dilations = lambda: {tuple(e.params["lhs_dilation"])
                       for e in find_eqns(grads, "conv_general_dilated", x,
                                          kernel)}
  assert (2, 2) not in dilations()  # polyphase: stride-1 convolutions only
  with ops.fast_paths(False):
    assert (2, 2) in dilations()  # XLA's zero-interleaved gradient


def test_standardization_plain_is_the_formula_differentiated():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(3.0, 0.5, (3, 3, 4, 6)), jnp.float32)
  gain = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=w.shape), jnp.float32)

  def value_and_vjp(w, gain):
    out, vjp = jax.vjp(standardize.standardize_weight, w, gain)
    return out, vjp(cotangent)

  (fast_out, fast_grads), (plain_out, plain_grads) = _both(
      value_and_vjp, w, gain)
  np.testing.assert_allclose(fast_out, plain_out, rtol=1e-5, atol=1e-6)
  scale = float(np.abs(plain_grads[0]).max())
  _assert_trees_close(fast_grads, plain_grads, rtol=1e-4, atol=1e-4 * scale)
  # The plain twin is also what `plain_standardize_weight` computes.
  np.testing.assert_array_equal(
      plain_out, standardize.plain_standardize_weight(w, gain))
  assert _has_custom_vjp(standardize.standardize_weight, w, gain)
  with ops.fast_paths(False):
    assert not _has_custom_vjp(standardize.standardize_weight, w, gain)


def test_recomputed_activation_chooses_where_it_is_called():
  # Made with the fast paths on, called with them off: the plain side runs.
  f = recompute.recomputed(lambda v: jax.nn.gelu(v) * 1.7)
  x = jnp.linspace(-3.0, 3.0, 64).reshape(8, 8)
  grad = jax.grad(lambda v: jnp.sum(f(v) * jnp.sin(v)))
  _assert_trees_close(*_both(grad, x), rtol=1e-6, atol=1e-7)
  assert find_eqns(grad, "optimization_barrier", x)
  with ops.fast_paths(False):
    assert not find_eqns(grad, "optimization_barrier", x)


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"a": (3, 3, 4, 8), "b": (3, 3, 4, 8), "c": (8,), "d": (),
            "e": (16, 10), "f": (8,)}
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in shapes.items()}


def test_norms_plain_reduces_each_leaf_alone():
  tree = _tree()
  leaves = jax.tree.leaves(tree)
  _assert_trees_close(*_both(norms.unit_sum_squares, leaves))
  fast, plain = _both(norms.global_norm, tree)
  np.testing.assert_allclose(fast, plain, rtol=1e-6)
  np.testing.assert_allclose(
      plain, np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                         for x in leaves)), rtol=1e-6)
  # Four shapes among six leaves: one reduction per shape, or per leaf.
  reductions = lambda: len(find_eqns(norms.unit_sum_squares, "reduce_sum",
                                     leaves))
  assert reductions() == 4
  with ops.fast_paths(False):
    assert reductions() == len(leaves) == 6


def test_agc_plain_clips_leaf_by_leaf_to_the_same_result():
  # Gradients from well under to well over the threshold, by leaf.
  params = _tree(0)
  grads = {k: x * s for (k, x), s in zip(
      _tree(1).items(), (0.01, 0.2, 0.02, 0.3, 0.04, 0.1))}
  tx = agc.adaptive_grad_clip(0.05, 1e-3)
  state = tx.init(params)
  update = lambda g, p: tx.update(g, state, p)
  (fast, fast_state), (plain, plain_state) = _both(update, grads, params)
  _assert_trees_close(fast, plain, rtol=1e-6, atol=1e-7)
  assert 0 < float(plain_state.clipped_fraction) < 1
  assert float(fast_state.clipped_fraction) == float(
      plain_state.clipped_fraction)


def test_layout_plain_leaves_the_tree_alone():
  tree = _tree()
  fast, plain = _both(layout.in_default_layout, tree)
  _assert_trees_close(fast, plain, rtol=0, atol=0)
  assert plain is tree
  assert find_eqns(layout.in_default_layout, "optimization_barrier", tree)
