"""The NFNet block against a direct float32 transcription of the paper.

`nfnets.models.nfnet.NFBlock` folds the skip gain, alpha, the SE gate and the
stochastic-depth mask into one per-example, per-channel scale and recomputes
activations in the backward pass (for speed); the reference below applies
each factor in turn, as ICML 2021 (Sec. 4-5, App. C) writes the block, with
plain `jax.lax` ops. Outputs and gradients must agree.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import layers
from nfnets.models import nfnet

_BETA, _ALPHA, _GROUP_WIDTH, _SE_RATIO = 0.8, 0.2, 4, 0.5


def _ws(w, gain, eps=1e-4):
  fan_in = np.prod(w.shape[:-1])
  mean = jnp.mean(w, axis=(0, 1, 2))
  var = jnp.mean((w - mean) ** 2, axis=(0, 1, 2))
  return gain * (w - mean) / jnp.sqrt(jnp.maximum(fan_in * var, eps))


def _conv(p, x, stride=1, groups=1):
  out = jax.lax.conv_general_dilated(
      x, _ws(p["w"], p["gain"]), (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  return out + p["bias"]


def _act(x):
  return jax.nn.gelu(x, approximate=True) * layers.GAMMAS["gelu"]


def _reference_block(params, x, stride, keep_mask, keep_prob):
  """h + alpha * skip_gain * drop(2 * sigmoid(SE) * f(act(h) * beta))."""
  p = {k.split("/")[-1]: v for k, v in params.items()}
  width = p["conv0"]["w"].shape[-1]
  groups = width // _GROUP_WIDTH
  out = _act(x) * _BETA
  shortcut = x
  if "conv_shortcut" in p:
    pooled = out
    if stride > 1:
      pooled = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
    shortcut = _conv(p["conv_shortcut"], pooled)
  h = _conv(p["conv0"], out)
  h = _conv(p["conv1"], _act(h), stride, groups)
  h = _conv(p["conv1b"], _act(h), 1, groups)
  h = _conv(p["conv2"], _act(h))
  squeezed = jnp.mean(h, axis=(1, 2))
  hidden = jax.nn.relu(squeezed @ p["linear"]["w"] + p["linear"]["b"])
  gate = jax.nn.sigmoid(hidden @ p["linear_1"]["w"] + p["linear_1"]["b"])
  h = 2.0 * gate[:, None, None, :] * h
  h = h * keep_mask / keep_prob
  return shortcut + _ALPHA * p["skip_gain"] * h


@pytest.mark.parametrize("in_ch,out_ch,stride", [(16, 16, 1), (8, 16, 2)])
def test_nfblock_matches_the_papers_formula(in_ch, out_ch, stride):
  drop_rate = 0.5

  def block(x):
    return nfnet.NFBlock(
        in_ch, out_ch, stride=stride, beta=_BETA, alpha=_ALPHA,
        group_width=_GROUP_WIDTH, activation=layers.scaled_activation("gelu"),
        se_ratio=_SE_RATIO, drop_rate=drop_rate, standardize=True,
        name="nf_block")(x, is_training=True)[0]

  f = hk.transform(block)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, in_ch))
  params = f.init(jax.random.PRNGKey(1), x)
  # A non-zero skip gain (SkipInit starts at 0), and non-trivial gains and
  # biases, so that every factor reaches the output and the gradients.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [
      leaf + 0.3 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])
  params["nf_block"]["skip_gain"] = jnp.asarray(0.7)
  rng = jax.random.PRNGKey(3)
  # The block's only random draw is its stochastic-depth mask, from the
  # first key of the apply rng's sequence.
  mask_key = hk.transform(hk.next_rng_key).apply({}, rng)
  keep_mask = jax.random.bernoulli(mask_key, 1 - drop_rate,
                                   (8, 1, 1, 1)).astype(jnp.float32)
  assert 0 < float(keep_mask.sum()) < 8  # Both cases occur.

  def ours(params, x):
    return f.apply(params, rng, x)

  def reference(params, x):
    by_layer = {k: v for k, v in params.items() if k != "nf_block"}
    by_layer["skip_gain"] = params["nf_block"]["skip_gain"]
    return _reference_block(by_layer, x, stride, keep_mask, 1 - drop_rate)

  np.testing.assert_allclose(ours(params, x), reference(params, x),
                             rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.PRNGKey(4),
                                ours(params, x).shape)
  loss = lambda fn: lambda p, v: jnp.sum(fn(p, v) * cotangent)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(params, x)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))
