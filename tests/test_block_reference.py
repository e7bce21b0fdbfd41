"""The NF blocks against direct float32 transcriptions of the papers.

`nfnets.models.nfnet.NFBlock` (and `nf_resnet.NFResBlock`) fold the skip
gain, alpha, the SE gate and the stochastic-depth mask into one per-example,
per-channel scale and recompute activations in the backward pass (for
speed); the references below apply each factor in turn, as ICML 2021 (Sec.
4-5, App. C) writes the block and the released code
(google-deepmind/deepmind-research `nfnets/nfnet.py`, `nf_resnet.py`)
computes it, with plain `jax.lax` ops. Outputs and gradients must agree.

Stochastic depth follows the released `base.StochDepth` (scale_by_keep=False):
a kept branch is not divided by the keep probability unless the block's
`scale_by_keep` asks for it.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import layers
from nfnets.models import nf_resnet
from nfnets.models import nfnet

_BETA, _ALPHA, _GROUP_WIDTH, _SE_RATIO = 0.8, 0.2, 4, 0.5
_DROP_RATE = 0.5


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


def _squeeze_excite(p, h):
  squeezed = jnp.mean(h, axis=(1, 2))
  hidden = jax.nn.relu(squeezed @ p["linear"]["w"] + p["linear"]["b"])
  gate = jax.nn.sigmoid(hidden @ p["linear_1"]["w"] + p["linear_1"]["b"])
  return 2.0 * gate[:, None, None, :] * h


def _drop(h, keep_mask, scale_by_keep):
  keep_prob = 1 - _DROP_RATE
  return h * keep_mask / keep_prob if scale_by_keep else h * keep_mask


def _reference_block(params, x, stride, keep_mask, scale_by_keep):
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
  if "conv1b" in p:
    h = _conv(p["conv1b"], _act(h), 1, groups)
  h = _conv(p["conv2"], _act(h))
  h = _drop(_squeeze_excite(p, h), keep_mask, scale_by_keep)
  return shortcut + _ALPHA * p["skip_gain"] * h


def _relu(x):
  return jax.nn.relu(x) * layers.GAMMAS["relu"]


def _reference_res_block(params, x, stride, keep_mask, scale_by_keep):
  """The released `NFResBlock` with use_se: the SE gate (times 2) multiplies
  the branch after conv2, before stochastic depth and the skip gain; the
  shortcut is a strided 1x1 conv of the normalised input."""
  p = {k.split("/")[-1]: v for k, v in params.items()}
  out = _relu(x) * _BETA
  shortcut = x
  if "conv_shortcut" in p:
    shortcut = _conv(p["conv_shortcut"], out[:, ::stride, ::stride])
  h = _conv(p["conv0"], out)
  h = _conv(p["conv1"], _relu(h), stride)
  h = _conv(p["conv2"], _relu(h))
  h = _drop(_squeeze_excite(p, h), keep_mask, scale_by_keep)
  return shortcut + _ALPHA * p["skip_gain"] * h


def _nf_block(in_ch, out_ch, stride, **kw):
  return nfnet.NFBlock(
      in_ch, out_ch, stride=stride, beta=_BETA, alpha=_ALPHA,
      group_width=_GROUP_WIDTH, activation=layers.scaled_activation("gelu"),
      se_ratio=_SE_RATIO, drop_rate=_DROP_RATE, standardize=True,
      name="block", **kw)


def _nf_res_block(in_ch, out_ch, stride, **kw):
  return nf_resnet.NFResBlock(
      in_ch, out_ch, stride=stride, beta=_BETA, alpha=_ALPHA,
      activation=layers.scaled_activation("relu"), se_ratio=_SE_RATIO,
      drop_rate=_DROP_RATE, standardize=True, name="block", **kw)


def _perturbed_params(f, x):
  params = f.init(jax.random.PRNGKey(1), x)
  # A non-zero skip gain (SkipInit starts at 0), and non-trivial gains and
  # biases, so that every factor reaches the output and the gradients.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [
      leaf + 0.3 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])
  params["block"]["skip_gain"] = jnp.asarray(0.7)
  return params


@pytest.mark.parametrize("kind,in_ch,out_ch,stride,options", [
    ("nfnet", 16, 16, 1, {}),
    ("nfnet", 8, 16, 2, {}),
    ("nfnet", 8, 16, 2, dict(scale_by_keep=True)),
    ("nfnet", 16, 16, 1, dict(use_two_convs=False, expansion=0.25)),
    ("nf_resnet", 16, 16, 1, {}),
    ("nf_resnet", 8, 16, 2, dict(scale_by_keep=True)),
])
def test_block_matches_the_papers_formula(kind, in_ch, out_ch, stride,
                                          options):
  make, reference_block = {
      "nfnet": (_nf_block, _reference_block),
      "nf_resnet": (_nf_res_block, _reference_res_block)}[kind]
  f = hk.transform(lambda x: make(in_ch, out_ch, stride, **options)(
      x, is_training=True)[0])
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, in_ch))
  params = _perturbed_params(f, x)
  rng = jax.random.PRNGKey(3)
  # The block's only random draw is its stochastic-depth mask, from the
  # first key of the apply rng's sequence.
  mask_key = hk.transform(hk.next_rng_key).apply({}, rng)
  keep_mask = jax.random.bernoulli(mask_key, 1 - _DROP_RATE,
                                   (8, 1, 1, 1)).astype(jnp.float32)
  assert 0 < float(keep_mask.sum()) < 8  # Both cases occur.

  def ours(params, x):
    return f.apply(params, rng, x)

  def reference(params, x):
    by_layer = {k: v for k, v in params.items() if k != "block"}
    by_layer["skip_gain"] = params["block"]["skip_gain"]
    return reference_block(by_layer, x, stride, keep_mask,
                           options.get("scale_by_keep", False))

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


@pytest.mark.parametrize("make", [_nf_block, _nf_res_block])
def test_kept_branches_are_not_rescaled_unless_asked(make):
  """Drop rate 0.5 in training: a kept example's branch is the evaluation
  branch itself (the released code), or twice it with scale_by_keep."""
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 16))

  def outputs(scale_by_keep):
    # The default path without the option, as code written before it.
    options = dict(scale_by_keep=True) if scale_by_keep else {}
    f = hk.transform(lambda x, is_training: make(
        16, 16, 1, **options)(x, is_training)[0])
    params = f.init(jax.random.PRNGKey(1), x, True)
    params["block"]["skip_gain"] = jnp.asarray(0.7)
    no_branch = dict(params, block=dict(skip_gain=jnp.asarray(0.0)))
    rng = jax.random.PRNGKey(5)
    shortcut = f.apply(no_branch, rng, x, False)
    return (f.apply(params, rng, x, True) - shortcut,
            f.apply(params, rng, x, False) - shortcut)

  trained, evaluated = outputs(scale_by_keep=False)
  kept = np.asarray(jnp.any(trained != 0, axis=(1, 2, 3)))
  assert 0 < kept.sum() < 16  # Both cases occur.
  np.testing.assert_array_equal(trained[~kept], 0)
  np.testing.assert_allclose(trained[kept], evaluated[kept], rtol=1e-6,
                             atol=1e-6)
  doubled, evaluated = outputs(scale_by_keep=True)
  np.testing.assert_array_equal(doubled[~kept], 0)
  np.testing.assert_allclose(doubled[kept], 2 * evaluated[kept], rtol=1e-6,
                             atol=1e-6)
