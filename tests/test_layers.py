"""Tests of the NF building blocks against the papers' formulas and figures.

Brock, De, Smith, ICLR 2021, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets" (Scaled WS, the gamma of each
activation); Brock, De, Smith, Simonyan, ICML 2021, "High-Performance
Large-Scale Image Recognition Without Normalization" (NFNet blocks).
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_helpers import count_primitive
from jaxpr_helpers import find_eqns
from nfnets import layers
from nfnets import ops
from nfnets.ops import standardize

# The gamma of each activation (ICLR 2021, App. D; the constants of the
# released code, google-deepmind/deepmind-research `nfnets/base.py`),
# checked independently of the constants in nfnets.layers.
SPEC_GAMMAS = {
    "relu": 1.7139589, "gelu": 1.7015043, "silu": 1.7881293,
    "elu": 1.2716005, "tanh": 1.5939118, "sigmoid": 4.8038354,
    "softplus": 1.9203323, "leaky_relu": 1.7059034, "identity": 1.0,
}


@pytest.mark.parametrize("name", sorted(SPEC_GAMMAS))
def test_gamma_matches_spec_and_quadrature(name):
  # The table holds the released code's constants, which the model must use
  # for released weights to evaluate as published.
  assert layers.GAMMAS[name] == pytest.approx(SPEC_GAMMAS[name], abs=1e-6)
  # Those constants are Monte-Carlo estimates: e.g. ReLU's 1.7139589 is not
  # its closed form sqrt(2 / (1 - 1/pi)) = 1.7128586. Exact quadrature agrees
  # with them to their sampling error (< 0.1%), not to 1e-4.
  computed = layers.activation_gamma(layers.ACTIVATIONS[name])
  assert computed == pytest.approx(SPEC_GAMMAS[name], rel=1e-3)


def test_relu_gamma_closed_form():
  assert layers.activation_gamma(jax.nn.relu) == pytest.approx(
      np.sqrt(2 / (1 - 1 / np.pi)), abs=1e-6)


@pytest.mark.parametrize("name", sorted(SPEC_GAMMAS))
def test_scaled_activation_has_unit_variance(name):
  z = jax.random.normal(jax.random.PRNGKey(0), (2_000_000,))
  var = float(jnp.var(layers.scaled_activation(name)(z)))
  # Monte-Carlo standard error of a variance estimate is ~sqrt(2/n) * kurtosis
  # factor; 1% is many standard errors even for the sigmoid's.
  assert var == pytest.approx(1.0, abs=0.01)


def test_scaled_activation_of_a_custom_callable():
  fn = layers.scaled_activation(lambda x: jnp.abs(x))
  z = jax.random.normal(jax.random.PRNGKey(1), (1_000_000,))
  assert float(jnp.var(fn(z))) == pytest.approx(1.0, abs=0.01)
  # Built inside a trace, as Haiku models are under jax.jit.
  traced = jax.jit(lambda x: layers.scaled_activation(jnp.abs)(x))(z)
  np.testing.assert_allclose(traced, fn(z), rtol=1e-6)


def test_unknown_activation_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown activation 'mish'.*relu"):
    layers.scaled_activation("mish")


def test_standardized_kernel_statistics():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 32)) * 3.0 + 1.5
  w_hat = np.asarray(standardize.standardize_weight(w, jnp.ones(32)))
  fan_in = 3 * 3 * 16
  flat = w_hat.reshape(fan_in, 32)
  np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(flat.var(0), 1.0 / fan_in, rtol=1e-4)


def test_standardization_is_invariant_to_shift_and_scale():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 4))
  gain = jnp.arange(1.0, 5.0)
  a = standardize.standardize_weight(w, gain)
  b = standardize.standardize_weight(w * 7.5 - 2.0, gain)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # The gain scales each output channel.
  np.testing.assert_allclose(a / gain, standardize.standardize_weight(
      w, jnp.ones(4)), atol=1e-6)


def test_standardization_of_bfloat16_kernels_is_float32():
  w = (jax.random.normal(jax.random.PRNGKey(4), (3, 3, 64, 8)) * 0.02 +
       3.0).astype(jnp.bfloat16)
  w_hat = standardize.standardize_weight(w, jnp.ones(8, jnp.bfloat16))
  assert w_hat.dtype == jnp.float32
  ref = np.asarray(w, np.float64).reshape(-1, 8)
  ref = (ref - ref.mean(0)) / np.sqrt(ref.shape[0] * ref.var(0))
  np.testing.assert_allclose(np.asarray(w_hat).reshape(-1, 8), ref,
                             rtol=1e-4, atol=1e-5)
  # The same arithmetic in bfloat16 is off by ~10% of the values (0.03 to
  # 0.06 here): this is why standardization runs in float32.
  naive = (w - jnp.mean(w, (0, 1, 2))) / jnp.sqrt(
      576 * jnp.var(w, (0, 1, 2)))
  assert np.abs(np.asarray(naive, np.float64).reshape(-1, 8) - ref).max() > 2e-3


def test_standardization_floor_on_constant_kernel():
  w_hat = standardize.standardize_weight(jnp.ones((1, 1, 4, 2)), jnp.ones(2))
  assert np.all(np.isfinite(w_hat)) and np.allclose(w_hat, 0.0)



def _np_standardize(w, gain, eps=1e-4):
  """Two-pass float64 reference of Scaled WS (ICLR 2021, Eq. 4)."""
  w = np.asarray(w, np.float64)
  flat = w.reshape(-1, w.shape[-1])
  n_var = np.maximum(flat.var(0) * flat.shape[0], eps)
  return ((w - flat.mean(0)) / np.sqrt(n_var)) * np.asarray(gain, np.float64)


def test_standardization_matches_two_pass_reference_on_hard_kernels():
  rng = np.random.default_rng(7)
  w = rng.normal(size=(3, 3, 16, 5)).astype(np.float32)
  w[..., 1] = w[..., 1] * 1e-2 + 1e3  # mean 1e5 times the spread
  w[..., 2] = 0.25  # constant: the eps floor
  w[..., 3] *= 1e-4  # N * var below eps: floored too
  gain = np.array([0.5, 2.0, 1.0, 3.0, -1.0], np.float32)
  w_hat = np.asarray(standardize.standardize_weight(jnp.asarray(w), gain))
  ref = _np_standardize(w, gain)
  # float32 rounding of w (1e3 +- 1e-2 carries ~6e-5 relative error per
  # element on the spread) bounds the agreement of channel 1.
  np.testing.assert_allclose(w_hat[..., [0, 2, 3, 4]], ref[..., [0, 2, 3, 4]],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_hat[..., 1], ref[..., 1], atol=2e-3)


def test_standardization_gradient_matches_autodiff_of_the_formula():
  def formula(w, gain, eps=1e-4):  # As written, differentiated by JAX.
    mean = jnp.mean(w, (0, 1, 2), keepdims=True)
    var = jnp.var(w, (0, 1, 2), keepdims=True)
    scale = jax.lax.rsqrt(jnp.maximum(var * 72, eps)) * gain
    return w * scale - mean * scale

  rng = np.random.default_rng(8)
  w = rng.normal(size=(3, 3, 8, 6)).astype(np.float32) + 0.3
  w[..., 4] = -1.0  # floored channel: only the mean path has a gradient
  w[..., 5] *= 1e-4
  gain = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=w.shape), jnp.float32)
  out, vjp = jax.vjp(standardize.standardize_weight, jnp.asarray(w), gain)
  ref_out, ref_vjp = jax.vjp(formula, jnp.asarray(w), gain)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  for got, want in zip(vjp(cotangent), ref_vjp(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_standardization_fast_path_takes_fewer_reductions_than_the_formula():
  # Two sums per channel forward (one pass), two backward (each reduction is
  # a small GPU kernel per conv and step); differentiating the formula as
  # written (the plain twin) takes about 10. A bound, not today's count.
  w, gain = jnp.ones((3, 3, 8, 4)), jnp.ones(4)
  vjp = lambda w, gain: jax.vjp(standardize.standardize_weight, w, gain)[1](w)
  fast = count_primitive(vjp, "reduce_sum", w, gain)
  with ops.fast_paths(False):
    plain = count_primitive(vjp, "reduce_sum", w, gain)
  assert fast <= 5 and plain >= 2 * fast


def _conv_apply(x, **kwargs):
  f = hk.transform(lambda x: layers.WSConv2D(**kwargs, name="conv")(x))
  params = f.init(jax.random.PRNGKey(0), x)
  return params, f


def test_ws_conv_params_shapes_and_grouped_conv():
  x = jnp.ones((2, 8, 8, 16))
  params, f = _conv_apply(x, output_channels=32, kernel_shape=3,
                          feature_group_count=4, stride=2)
  assert {k: v.shape for k, v in params["conv"].items()} == {
      "w": (3, 3, 4, 32), "gain": (32,), "bias": (32,)}
  assert f.apply(params, None, x).shape == (2, 4, 4, 32)


def test_ws_conv_matches_numpy_conv_of_standardized_kernel():
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 5, 3))
  params, f = _conv_apply(x, output_channels=4, kernel_shape=3)
  out = np.asarray(f.apply(params, None, x))
  w = np.asarray(params["conv"]["w"], np.float64)
  w_hat = (w - w.mean((0, 1, 2))) / np.sqrt(27 * w.var((0, 1, 2)))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = np.zeros((5, 5, 4))
  for i in range(5):
    for j in range(5):
      ref[i, j] = np.einsum("hwc,hwco->o", xp[0, i:i + 3, j:j + 3], w_hat)
  np.testing.assert_allclose(out[0], ref, atol=1e-4)


def test_ws_conv_bfloat16_standardizes_in_float32():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 8))
  params, f = _conv_apply(x, output_channels=8, kernel_shape=3)
  ref = f.apply(params, None, x)
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  out = f.apply(bf16, None, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1,
                             rtol=0.05)


def test_ws_conv_bad_groups():
  with pytest.raises(ValueError, match="groups"):
    _conv_apply(jnp.ones((1, 4, 4, 6)), output_channels=8,
                feature_group_count=4)


@pytest.mark.parametrize("scale_by_keep", [False, True])
def test_stochastic_depth_is_per_example(scale_by_keep):
  # The released code's `base.StochDepth` defaults to scale_by_keep=False
  # (and NFNet/NF-ResNet keep it): a kept branch passes through unchanged, so
  # the mean is keep = 0.75. With scale_by_keep it is 1/keep and unbiased.
  f = hk.transform(lambda x: layers.stochastic_depth(
      x, 0.25, True, scale_by_keep=scale_by_keep))
  x = jnp.ones((4096, 2, 2, 3))
  out = np.asarray(f.apply(None, jax.random.PRNGKey(0), x))
  per_example = out.reshape(4096, -1)
  kept = 1 / 0.75 if scale_by_keep else 1.0
  # Each example is either all dropped or all kept.
  np.testing.assert_array_equal(np.unique(per_example),
                                np.float32([0.0, kept]))
  assert np.all(per_example.min(1) == per_example.max(1))
  mean = 1.0 if scale_by_keep else 0.75
  assert per_example.mean() == pytest.approx(mean, abs=0.05)
  off = hk.transform(lambda x: layers.stochastic_depth(
      x, 0.25, False, scale_by_keep=scale_by_keep))
  assert np.array_equal(off.apply(None, None, x), x)


def test_stochastic_depth_keeps_branches_unscaled_by_default():
  # Drop rate 0.5: a kept example's branch is the branch itself, not twice
  # it (the 1/keep rescaling this layer used to apply unconditionally).
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 3, 3, 4))
  rng = jax.random.PRNGKey(1)
  drop = lambda **kw: hk.transform(  # pylint: disable=g-long-lambda
      lambda x: layers.stochastic_depth(x, 0.5, True, **kw)).apply(
          None, rng, x)
  out, doubled = drop(), drop(scale_by_keep=True)
  kept = np.asarray(jnp.any(out != 0, axis=(1, 2, 3)))
  assert 0 < kept.sum() < 64
  np.testing.assert_array_equal(out[kept], x[kept])
  np.testing.assert_array_equal(doubled[kept], 2 * x[kept])
  np.testing.assert_array_equal(out[~kept], 0)
  np.testing.assert_array_equal(doubled[~kept], 0)


@pytest.mark.parametrize("is_training", [True, False])
def test_stochastic_depth_folds_a_per_channel_scale(is_training):
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2, 2, 3))
  scale = jnp.asarray([0.5, -2.0, 3.0])  # e.g. skip gain times an SE gate
  drop = lambda s: hk.transform(  # pylint: disable=g-long-lambda
      lambda x: layers.stochastic_depth(x, 0.25, is_training, s))
  rng = jax.random.PRNGKey(1)
  np.testing.assert_allclose(drop(scale).apply(None, rng, x),
                             drop(1.0).apply(None, rng, x) * scale,
                             rtol=1e-6)
  # bfloat16 in, bfloat16 out: the scale is cast once.
  assert drop(scale).apply(None, rng, x.astype(jnp.bfloat16)).dtype == (
      jnp.bfloat16)


def test_squeeze_excite_gate():
  f = hk.transform(lambda x: layers.SqueezeExcite(8, 4)(x))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 8))
  params = f.init(jax.random.PRNGKey(1), x)
  gate = f.apply(params, None, x)
  assert gate.shape == (3, 1, 1, 8)
  assert np.all((gate > 0) & (gate < 1))
  assert sorted(params) == ["squeeze_excite/~/linear",
                            "squeeze_excite/~/linear_1"]


@pytest.mark.parametrize("name", ["gelu", "relu", "silu", "elu", "softplus"])
def test_scaled_activation_backward_keeps_only_its_input(name):
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 6, 8))
  scaled = layers.scaled_activation(name)
  _, backward = jax.vjp(scaled, x)
  # What the backward pass holds on to: the input alone (GELU's plain VJP
  # keeps five more arrays, its tanh among them).
  residuals = [r for r in jax.tree.leaves(backward) if r.size > 1]
  assert len(residuals) == 1 and np.array_equal(residuals[0], x)
  # Recomputing gives the plain formula's gradient.
  g = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  plain = lambda v: layers.ACTIVATIONS[name](v) * layers.GAMMAS[name]
  np.testing.assert_allclose(backward(g)[0], jax.vjp(plain, x)[1](g)[0],
                             rtol=1e-6, atol=1e-7)


def test_scaled_activation_backward_fences_only_its_input():
  # The recomputation is kept apart from the forward pass by an optimization
  # barrier on the saved input alone: a barrier on the incoming gradient
  # (`jax.checkpoint` puts one on all its inputs when it lowers) would keep
  # the gradient's producer from fusing into the backward kernel.
  x = jnp.ones((2, 4, 4, 8))
  scaled = layers.scaled_activation("gelu")
  grad = jax.grad(lambda v: jnp.sum(scaled(v) * jnp.arange(8.0)))
  barriers = find_eqns(grad, "optimization_barrier", x)
  assert len(barriers) == 1 and len(barriers[0].invars) == 1
  assert barriers[0].invars[0].aval.shape == x.shape
