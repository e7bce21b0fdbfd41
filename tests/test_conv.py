"""`nfnets.ops.conv.conv2d`: its polyphase input gradient against XLA's."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_helpers import find_eqns
from nfnets.ops import conv


def _xla_conv(x, kernel, stride, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, stride, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


def _gradients(fn, x, kernel, stride, groups):
  out, backward = jax.vjp(lambda a, b: fn(a, b, stride, groups), x, kernel)
  d_out = jax.random.normal(jax.random.PRNGKey(2), out.shape, out.dtype)
  return out, backward(d_out)


# Even and odd sizes (SAME pads 0/1 or 1/1 or more), kernels smaller than,
# equal to and larger than the stride, unequal strides.
_CASES = [(size, kernel, stride, 2 + 2 * (i % 2)) for i, (size, kernel, stride)
          in enumerate(itertools.product(
              [(8, 8), (9, 7)], [(3, 3), (1, 1), (5, 2)],
              [(2, 2), (3, 3), (2, 1)]))]


@pytest.mark.parametrize("size,kernel_shape,stride,groups", _CASES)
def test_strided_grouped_gradients_equal_xlas(size, kernel_shape, stride,
                                              groups):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, *size, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1),
                             (*kernel_shape, 8 // groups, 12))
  ours = _gradients(conv.conv2d, x, kernel, stride, groups)
  xla = _gradients(_xla_conv, x, kernel, stride, groups)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_bfloat16_gradients_equal_xlas():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 12, 12, 16), jnp.bfloat16)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 16),
                             jnp.bfloat16)
  ours = _gradients(conv.conv2d, x, kernel, (2, 2), 2)
  xla = _gradients(_xla_conv, x, kernel, (2, 2), 2)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=2e-2, atol=0.1)


def _lhs_dilations(fn, *args):
  """The input dilations of every convolution `fn(*args)` traces to."""
  return [tuple(e.params["lhs_dilation"]) for e in
          find_eqns(fn, "conv_general_dilated", *args)]


def test_strided_grouped_input_gradient_has_no_zero_interleaving():
  x = jnp.ones((2, 8, 8, 8))
  kernel = jnp.ones((3, 3, 4, 8))
  grad_x = lambda fn: jax.grad(  # pylint: disable=g-long-lambda
      lambda a: jnp.sum(fn(a, kernel, (2, 2), 2)))
  # XLA's own gradient convolves a zero-interleaved output gradient...
  assert (2, 2) in _lhs_dilations(grad_x(_xla_conv), x)
  # ... the polyphase one runs four stride-1 convolutions without it.
  dilations = _lhs_dilations(grad_x(conv.conv2d), x)
  assert dilations and set(dilations) == {(1, 1)}


@pytest.mark.parametrize("stride,groups", [((1, 1), 4), ((2, 2), 1)])
def test_other_convolutions_are_xlas(stride, groups):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8 // groups, 8))
  assert str(jax.make_jaxpr(jax.grad(
      lambda a: jnp.sum(conv.conv2d(a, kernel, stride, groups))))(x)) == str(
          jax.make_jaxpr(jax.grad(
              lambda a: jnp.sum(_xla_conv(a, kernel, stride, groups))))(x))
