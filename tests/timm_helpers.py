"""What the tests of the timm-tree models share (no torch, no timm).

The fixtures in tests/data (written by scripts/timm_fixture.py) as Haiku
params, and timm's block written out as a reference.
"""

import functools
import json
import pathlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models import nfnet_light
import model_helpers

DATA = pathlib.Path(__file__).parent / "data"


@functools.cache
def fixture() -> dict:
  return json.loads((DATA / "timm_fixture.json").read_text())


@functools.cache
def tiny_arrays() -> dict[str, np.ndarray]:
  with np.load(DATA / "timm_tiny_logits.npz") as arrays:
    return dict(arrays)


def tiny_weights(shapes: dict[str, list[int]],
                 seed: int) -> dict[str, np.ndarray]:
  """scripts/timm_fixture.py's `tiny_weights`, copied: the same numbers."""
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in shapes.items():
    z = rng.standard_normal(shape)
    if key.endswith(".gain") or key.endswith(".skipinit_gain"):
      z = 1.0 + 0.3 * z
    elif key.endswith(".bias"):
      z = 0.3 * z
    else:
      z = z / np.sqrt(np.prod(shape[1:]))
    weights[key] = np.asarray(z, np.float32)  # 0-d too (skipinit_gain)
  return weights


def to_haiku(state_dict: dict[str, np.ndarray], root: str) -> dict:
  """timm's state dict -> a Haiku params tree, key for key."""
  params = {}
  for key, value in state_dict.items():
    module, name = nfnet_light.haiku_name(key, root)
    params.setdefault(module, {})[name] = nfnet_light.haiku_array(key, value)
  return params


# timm's constructor options of the tiny models -> ours.
_OPTIONS = {"width_factor": "width_multiplier", "group_size": "group_width",
            "depths": "depths", "bottle_ratio": "expansion",
            "num_features": "final_conv_ch"}
# What makes timm's dm_nfnet compute DeepMind's function, which ours is
# (scripts/timm_fixture.py): no option of ours.
_DEEPMIND = {"act_layer": "gelu_tanh", "std_conv_eps": 1e-10}


def tiny_state(name: str):
  """(our constructor options, timm's state dict, input, timm's logits)."""
  case = fixture()["tiny"][name]
  ours = {}
  for key, value in case["options"].items():
    if key in _DEEPMIND:
      assert value == _DEEPMIND[key], (key, value)
    else:
      assert key in _OPTIONS, f"no option of ours for timm's {key}"
      ours[_OPTIONS[key]] = tuple(value) if isinstance(value, list) else value
  arrays = tiny_arrays()
  return (ours, tiny_weights(case["keys"], case["seed"]), arrays["input"],
          arrays[name])


def tiny_case(name: str, root: str):
  """(our constructor options, Haiku params, input, timm's logits)."""
  ours, state, images, logits = tiny_state(name)
  return ours, to_haiku(state, root), images, logits


# ------------------------------------- timm's NormFreeBlock, written out
# The block's computation as timm's `NormFreeBlock.forward` and its layers
# (`ScaledStdConv2d`, `EcaModule`, `SEModule`, `DropPath`) write it, one
# factor after another with plain jax.numpy, against which the block (which
# folds alpha, the gate and the drop mask into one multiply) is checked.

BLOCK_OPTIONS = dict(beta=0.8, alpha=0.2, drop_rate=0.5)


def ws_conv(p, x, gamma, stride=1, groups=1):
  """`ScaledStdConv2d`: the kernel batch-normed, symmetric padding."""
  w = p["w"]
  fan_in = np.prod(w.shape[:-1])
  mean = w.mean(axis=(0, 1, 2))
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2))
  kernel = (w - mean) / jnp.sqrt(var + 1e-5) * p["gain"] * gamma / np.sqrt(
      fan_in)
  pad = ((stride - 1) + (w.shape[0] - 1)) // 2
  out = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  return out + p["b"]


def eca_gate(p, h):
  y = h.mean(axis=(1, 2))  # [N, C]
  k = p["conv"]["w"][:, 0, 0]
  padded = jnp.pad(y, ((0, 0), (len(k) // 2, len(k) // 2)))
  z = sum(k[j] * padded[:, j:j + y.shape[1]] for j in range(len(k)))
  return jax.nn.sigmoid(z)[:, None, None, :]


def se_gate(p, h):
  y = h.mean(axis=(1, 2))
  hidden = jax.nn.relu(y @ p["fc1"]["w"][0, 0] + p["fc1"]["b"])
  z = hidden @ p["fc2"]["w"][0, 0] + p["fc2"]["b"]
  return jax.nn.sigmoid(z)[:, None, None, :]


def reference_block(p, x, *, stride, groups, keep_mask, act, gamma):
  """timm's NormFreeBlock.forward (even sizes: the pool is a plain mean)."""
  beta, alpha, drop = (BLOCK_OPTIONS[k] for k in ("beta", "alpha",
                                                  "drop_rate"))
  out = act(x) * beta
  shortcut = x
  if "downsample" in p:
    pooled = out
    if stride > 1:
      n, h, w, c = out.shape
      pooled = out.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    shortcut = ws_conv(p["downsample"]["conv"], pooled, gamma)
  h = ws_conv(p["conv1"], out, gamma)
  h = ws_conv(p["conv2"], act(h), gamma, stride, groups)
  if "conv2b" in p:
    h = ws_conv(p["conv2b"], act(h), gamma, 1, groups)
  h = ws_conv(p["conv3"], act(h), gamma)
  if "attn_last" in p:
    gate = (eca_gate if "conv" in p["attn_last"] else se_gate)(
        p["attn_last"], h)
    h = 2.0 * gate * h
  h = h * keep_mask / (1 - drop)  # DropPath rescales the kept branches
  return h * alpha + shortcut


def nested(params):
  """{'block/~/a/~/b': {...}} -> {'a': {'b': {...}}} below the block."""
  tree = {}
  for path, leaves in params.items():
    node = tree
    for part in path.split("/~/")[1:]:
      node = node.setdefault(part, {})
    node.update(leaves)
  return tree


def check_block(make_block, x, *, stride, groups, act, gamma):
  """The block's output and gradients equal `reference_block`'s."""
  f = hk.transform(lambda x: make_block()(x, is_training=True)[0])
  params = f.init(jax.random.PRNGKey(1), x)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  # The last conv's zero gain (and the other inits) perturbed, so that
  # every factor reaches the output and the gradients.
  params = jax.tree.unflatten(treedef, [
      leaf + 0.3 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])
  rng = jax.random.PRNGKey(3)
  # The block's only random draw: its drop mask, from the rng's first key.
  mask_key = hk.transform(hk.next_rng_key).apply({}, rng)
  keep_mask = jax.random.bernoulli(
      mask_key, 1 - BLOCK_OPTIONS["drop_rate"], (x.shape[0], 1, 1, 1))
  assert 0 < int(keep_mask.sum()) < x.shape[0]  # both cases occur

  def ours(p, v):
    return f.apply(p, rng, v)

  def reference(p, v):
    return reference_block(nested(p), v, stride=stride, groups=groups,
                           keep_mask=keep_mask.astype(jnp.float32), act=act,
                           gamma=gamma)

  shape = jax.eval_shape(ours, params, x).shape
  cotangent = jax.random.normal(jax.random.PRNGKey(4), shape)

  def output_and_grads(fn):
    def both(p, v):
      out, vjp = jax.vjp(fn, p, v)
      return out, vjp(cotangent)
    return model_helpers.fast_jit(both)(params, x)

  got, got_grads = output_and_grads(ours)
  want, want_grads = output_and_grads(reference)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))
