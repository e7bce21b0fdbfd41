"""Tests for nfnets.agc (AGC, Brock et al. 2021, Sec. 4.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxpr_helpers import count_primitive
from nfnets import agc
from nfnets.ops import norms

CLIP = 0.1
EPS = 1e-3
SHAPES = {"conv": (3, 3, 4, 8), "dense": (16, 10), "vec": (8,), "scalar": ()}


def _np_unit_slices(shape):
  """Index of every unit: one output channel, or the whole array if ndim<=1."""
  if len(shape) <= 1:
    return [...]
  return [(..., o) for o in range(shape[-1])]


def _np_agc(grad, param, clipping=CLIP, eps=EPS):
  """Independent float64 reference: loops over units one at a time."""
  g = np.asarray(grad, np.float64)
  w = np.asarray(param, np.float64)
  out = g.copy()
  clipped = []
  for idx in _np_unit_slices(g.shape):
    g_norm = np.sqrt(np.sum(g[idx] ** 2))
    w_norm = max(np.sqrt(np.sum(w[idx] ** 2)), eps)
    is_clipped = g_norm / w_norm > clipping
    if is_clipped:
      out[idx] = g[idx] * (clipping * w_norm / g_norm)
    clipped.append(is_clipped)
  return out, clipped


def _make_tree(seed=0, dtype=jnp.float32):
  """Params and grads where even units are far under and odd far over."""
  rng = np.random.default_rng(seed)
  params, grads = {}, {}
  for i, (name, shape) in enumerate(SHAPES.items()):
    w = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    for j, idx in enumerate(_np_unit_slices(shape)):
      # Scale each unit's grad to 1e-3x or 1e2x of lambda * ||W||.
      factor = 1e2 if (i + j) % 2 else 1e-3
      target = factor * CLIP * np.linalg.norm(w[idx])
      g[idx] = g[idx] * (target / np.linalg.norm(g[idx]))
    params[name] = jnp.asarray(w, dtype)
    grads[name] = jnp.asarray(g, dtype)
  return params, grads


def _apply(grads, params, **kwargs):
  tx = agc.adaptive_grad_clip(CLIP, EPS, **kwargs)
  return tx.update(grads, tx.init(params), params)


def test_unitwise_norm_shapes_and_dtype():
  expected = {(): (), (8,): (1,), (16, 10): (1, 10), (2, 3, 5): (1, 1, 5),
              (3, 3, 4, 8): (1, 1, 1, 8)}
  for shape, norm_shape in expected.items():
    norm = agc.unitwise_norm(jnp.ones(shape, jnp.bfloat16))
    assert norm.shape == norm_shape
    assert norm.dtype == jnp.float32


def test_matches_numpy_reference():
  params, grads = _make_tree()
  new_grads, state = _apply(grads, params)
  total_clipped, total_units = 0, 0
  for name in SHAPES:
    ref, clipped = _np_agc(grads[name], params[name])
    out = np.asarray(new_grads[name])
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-12)
    assert 0 < sum(clipped) < len(clipped) or len(clipped) == 1
    g_in = np.asarray(grads[name])
    w = np.asarray(params[name], np.float64)
    for idx, was_clipped in zip(_np_unit_slices(out.shape), clipped):
      ratio = np.linalg.norm(np.asarray(out[idx], np.float64)) / max(
          np.linalg.norm(w[idx]), EPS)
      assert ratio <= CLIP + 1e-6
      if not was_clipped:
        np.testing.assert_array_equal(out[idx], g_in[idx])  # bit-exact
    total_clipped += sum(clipped)
    total_units += len(clipped)
  assert state.clipped_fraction.dtype == jnp.float32
  np.testing.assert_allclose(state.clipped_fraction,
                             total_clipped / total_units, rtol=1e-6)



def test_same_shaped_leaves_are_clipped_one_by_one():
  # The norms are reduced in groups of equal shape; each leaf must still get
  # its own units' norms (two copies of every shape, different values).
  trees = [_make_tree(seed) for seed in (3, 4)]
  params = {f"{n}{k}": t[0][n] for k, t in enumerate(trees) for n in SHAPES}
  grads = {f"{n}{k}": t[1][n] for k, t in enumerate(trees) for n in SHAPES}
  mask = {name: not name.startswith("dense1") for name in params}
  new_grads, state = _apply(grads, params, mask=mask)
  total_clipped, total_units = 0, 0
  for name in params:
    if not mask[name]:
      np.testing.assert_array_equal(new_grads[name], grads[name])
      continue
    ref, clipped = _np_agc(grads[name], params[name])
    np.testing.assert_allclose(new_grads[name], ref, rtol=1e-6, atol=1e-12)
    total_clipped += sum(clipped)
    total_units += len(clipped)
  np.testing.assert_allclose(state.clipped_fraction,
                             total_clipped / total_units, rtol=1e-6)


def test_unit_sum_squares_matches_numpy_per_leaf():
  rng = np.random.default_rng(5)
  shapes = [(3, 3, 4, 8), (8,), (3, 3, 4, 8), (), (16, 10), (8,), (), (8,)]
  leaves = [jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in shapes]
  sums = norms.unit_sum_squares(leaves)
  for x, s in zip(leaves, sums):
    x = np.asarray(x, np.float64)
    axes = None if x.ndim <= 1 else tuple(range(x.ndim - 1))
    ref = np.sum(x * x, axis=axes, keepdims=True)
    assert s.shape == ref.shape and s.dtype == jnp.float32
    np.testing.assert_allclose(s, ref, rtol=1e-6)
  np.testing.assert_allclose(
      norms.global_norm({"a": leaves[:3], "b": leaves[3:]}),
      np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves)),
      rtol=1e-6)

def test_clip_unitwise_counts():
  params, grads = _make_tree(seed=1)
  g, n_clipped, n_units = agc.clip_unitwise(grads["conv"], params["conv"],
                                            CLIP, EPS)
  _, clipped = _np_agc(grads["conv"], params["conv"])
  assert g.shape == grads["conv"].shape
  assert int(n_clipped) == sum(clipped) and n_units == 8


def _haiku_tree(huge=1e4):
  rng = np.random.default_rng(2)
  shapes = {
      "NFNet/~/linear": {"w": (16, 10), "b": (10,)},
      "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": (8, 4), "b": (4,)},
      "NFNet/~/stem_conv0": {"w": (3, 3, 3, 16), "b": (16,)},
  }
  params = {m: {k: jnp.asarray(rng.normal(size=s), jnp.float32)
                for k, s in d.items()} for m, d in shapes.items()}
  grads = jax.tree.map(lambda p: huge * jnp.ones_like(p), params)
  return params, grads


@pytest.mark.parametrize("precompute", [True, False])
def test_classifier_mask_skips_only_the_classifier_weight(precompute):
  # As the released code's `_make_opt`: the classifier's weight is not
  # clipped, its bias is (it is in the gains-and-biases group).
  params, grads = _haiku_tree()
  mask = agc.classifier_mask(params) if precompute else agc.classifier_mask
  new_grads, state = _apply(grads, params, mask=mask)
  np.testing.assert_array_equal(new_grads["NFNet/~/linear"]["w"],
                                grads["NFNet/~/linear"]["w"])
  for m, k in (("NFNet/~/linear", "b"),
               ("NFNet/~/nf_block/~/squeeze_excite/~/linear", "w"),
               ("NFNet/~/nf_block/~/squeeze_excite/~/linear", "b"),
               ("NFNet/~/stem_conv0", "w"), ("NFNet/~/stem_conv0", "b")):
    ref, _ = _np_agc(grads[m][k], params[m][k])
    np.testing.assert_allclose(new_grads[m][k], ref, rtol=1e-6)
  # Every masked-in unit is clipped; the classifier weight's are not counted.
  assert float(state.clipped_fraction) == 1.0


def test_classifier_mask_values_and_errors():
  params, _ = _haiku_tree()
  mask = agc.classifier_mask(params)
  assert mask["NFNet/~/linear"] == {"w": False, "b": True}
  assert all(jax.tree.leaves(
      mask["NFNet/~/nf_block/~/squeeze_excite/~/linear"]))
  with pytest.raises(ValueError, match="stem_conv0"):
    agc.classifier_mask(params, classifier="logits")
  with pytest.raises(ValueError, match="logits"):
    agc.classifier_mask({"NFNet/~/nf_block/~/logits": {"w": jnp.ones(2)}},
                        classifier="logits")


def test_bfloat16_matches_float32():
  params, grads = _make_tree(seed=3, dtype=jnp.bfloat16)
  new_grads, _ = _apply(grads, params)
  params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  grads32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
  ref, _ = _apply(grads32, params32)
  for name in SHAPES:
    assert new_grads[name].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new_grads[name], np.float32),
                               ref[name], rtol=1e-2, atol=1e-6)


def test_norms_are_float32_for_low_precision_inputs():
  # 3 * sqrt(1000) = 94.868..., which rounds to 95.0 in bf16.
  expected = 3 * np.sqrt(1000.0)
  assert abs(float(jnp.bfloat16(expected)) - expected) / expected > 1e-3
  norm = agc.unitwise_norm(jnp.full((1000,), 3, jnp.bfloat16))
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(norm, expected, rtol=1e-6)
  # 65536 * 300**2 overflows float16 (max 65504) if summed in float16.
  for dtype in (jnp.float16, jnp.bfloat16):
    g = jnp.full((65536,), 300, dtype)
    np.testing.assert_allclose(agc.unitwise_norm(g), 76800.0, rtol=1e-6)
    w = jnp.ones((65536,), dtype)  # ||W|| = 256, so the clipped value is 0.01.
    out, n_clipped, _ = agc.clip_unitwise(g, w, 0.01, EPS)
    assert out.dtype == dtype and int(n_clipped) == 1
    np.testing.assert_allclose(np.asarray(out, np.float32), 0.01, rtol=1e-2)


def test_zero_grads_and_zero_params():
  w = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3)), jnp.float32)
  out, n_clipped, _ = agc.clip_unitwise(jnp.zeros((4, 3)), w, CLIP, EPS)
  assert int(n_clipped) == 0
  np.testing.assert_array_equal(out, np.zeros((4, 3)))
  # Zero params: the threshold is clipping * eps per unit.
  g = jnp.full((4, 3), 0.5)  # each unit has norm 1
  out, n_clipped, _ = agc.clip_unitwise(g, jnp.zeros((4, 3)), CLIP, EPS)
  assert int(n_clipped) == 3
  np.testing.assert_allclose(np.linalg.norm(out, axis=0), CLIP * EPS,
                             rtol=1e-6)


def test_invalid_arguments():
  for bad in (0.0, -1.0):
    with pytest.raises(ValueError, match="clipping"):
      agc.adaptive_grad_clip(bad)
  with pytest.raises(ValueError, match="eps"):
    agc.adaptive_grad_clip(CLIP, eps=0.0)
  tx = agc.adaptive_grad_clip(CLIP)
  params, grads = _make_tree()
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params))


def test_init_state_and_jit_chain():
  params, grads = _make_tree()
  tx = optax.chain(agc.adaptive_grad_clip(CLIP, EPS), optax.sgd(0.1))
  state = tx.init(params)
  assert float(state[0].clipped_fraction) == 0.0

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  new_params, updates, state = step(params, state)
  ref, _ = _apply(grads, params)
  for name in SHAPES:
    np.testing.assert_allclose(updates[name], -0.1 * ref[name], rtol=1e-6)
    assert new_params[name].shape == params[name].shape
  assert 0.0 < float(state[0].clipped_fraction) < 1.0


def test_matches_optax_adaptive_grad_clip():
  params, grads = _make_tree(seed=5)
  ours, _ = _apply(grads, params)
  tx = optax.adaptive_grad_clip(CLIP, EPS)
  theirs, _ = tx.update(grads, tx.init(params), params)
  for name in SHAPES:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6,
                               atol=1e-12)


def test_inside_shard_map():
  params, grads = _make_tree(seed=6)
  tx = agc.adaptive_grad_clip(CLIP, EPS)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))

  def f(grads, params):
    return tx.update(grads, tx.init(params), params)

  sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P()),
                                  out_specs=P()))
  out, state = sharded(grads, params)
  ref, ref_state = f(grads, params)
  for name in SHAPES:
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-6)
  np.testing.assert_allclose(state.clipped_fraction, ref_state.clipped_fraction)


def test_mismatched_grad_and_param_shapes_are_an_error():
  params, grads = _make_tree()
  grads["vec"] = jnp.ones((3,))
  with pytest.raises(ValueError, match=r"shapes differ: \(3,\) vs \(8,\)"):
    _apply(grads, params)


@pytest.mark.parametrize("copies", [5, 20])
def test_reductions_do_not_grow_with_the_number_of_leaves(copies):
  # On GPUs every reduction is a kernel launch: the norms of same-shaped
  # leaves are reduced together, so 4 shapes cost the same for 20 or 80
  # leaves (the per-unit norms, the clipped count, the global norm).
  params, grads = {}, {}
  for k in range(copies):
    tree_params, tree_grads = _make_tree(seed=k)
    params.update({f"{n}{k}": v for n, v in tree_params.items()})
    grads.update({f"{n}{k}": v for n, v in tree_grads.items()})
  tx = agc.adaptive_grad_clip(CLIP, EPS)
  state = tx.init(params)
  update = lambda g, p: tx.update(g, state, p)
  assert count_primitive(update, "reduce_sum", grads, params) <= 6
  assert count_primitive(norms.global_norm, "reduce_sum", grads) <= 5
