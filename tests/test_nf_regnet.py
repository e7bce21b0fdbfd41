"""NF-RegNet B0-B8 against DeepMind's released code, and its config.

The released code (google-deepmind/deepmind-research `nfnets/nf_regnet.py`,
`base.py`'s `nf_regnet_params`, `experiment_nf_regnets.py`) transcribed
independently of `nfnets.models.nf_regnet`: its table, its parameter tree
(Haiku's names for its modules), its block in plain `jax.lax` and its lr
schedule. The counts were confirmed once with the released `NF_RegNet`
itself under `jax.eval_shape`. What runs is small; full sizes only go
through `jax.eval_shape`.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_helpers import ALPHA
from model_helpers import fast_jit
from model_helpers import set_skip_gains
from nfnets import layers
from nfnets import models
from nfnets.models import nf_regnet
from nfnets.training import experiment_config
from nfnets.training import optim

import configs.nf_regnet as regnet_config  # pylint: disable=g-bad-import-order

# The released `nf_regnet_params`: widths, depths, train/test size, dropout.
RELEASED_TABLE = {
    "B0": ((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    "B1": ((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    "B2": ((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    "B3": ((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    "B4": ((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    "B5": ((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    "B6": ((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    "B7": ((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    "B8": ((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
}
# The released `NF_RegNet(1000, variant)`'s, counted under jax.eval_shape.
RELEASED_PARAMS = {
    "B0": 8_595_372, "B1": 10_019_208, "B2": 13_785_904,
    "B3": 18_136_667, "B4": 29_315_830, "B5": 48_707_138,
    "B6": 70_045_805, "B7": 101_743_204, "B8": 142_314_441,
}


def _released_tree(variant, width=0.75, expansion=2.25, group_size=8):
  """{module path: {name: shape}} of the released `NF_RegNet(1000)`."""
  widths, depths = RELEASED_TABLE[variant][:2]
  tree = {}

  def conv(path, kernel, cin, cout, groups=1):
    tree[path] = {"w": (kernel, kernel, cin // groups, cout), "gain": (cout,),
                  "bias": (cout,)}

  ch = int(widths[0] * width)
  conv("NF_RegNet/~/initial_conv", 3, 3, ch)
  index = 0
  for stage_width, depth in zip(widths, depths):
    for j in range(depth):
      block = "NF_RegNet/~/nf_block" + (f"_{index}" if index else "")
      out = int(stage_width * width)
      mid = int(ch * (1 if index == 0 else expansion)) // group_size
      mid *= group_size
      conv(f"{block}/~/conv0", 1, ch, mid)
      conv(f"{block}/~/conv1", 3, mid, mid, mid // group_size)
      conv(f"{block}/~/conv2", 1, mid, out)
      if j == 0 or ch != out:  # stride 2 or a width change
        conv(f"{block}/~/conv_shortcut", 1, ch, out)
      hidden = max(1, int(mid * 0.5))  # se_ratio
      se = f"{block}/~/squeeze_excite/~/"
      tree[se + "linear"] = {"w": (mid, hidden), "b": (hidden,)}
      tree[se + "linear_1"] = {"w": (hidden, mid), "b": (mid,)}
      tree[block] = {"skip_gain": ()}
      ch, index = out, index + 1
  final = int(1280 * ch // 440)
  conv("NF_RegNet/~/final_conv", 1, ch, final)
  tree["NF_RegNet/~/linear"] = {"w": (final, 1000), "b": (1000,)}
  return tree


def _count(tree):
  return sum(math.prod(s) for leaves in tree.values() for s in leaves.values())


def _shapes(name, **overrides):
  model = models.build_model(name, **overrides)
  params, state = jax.eval_shape(
      lambda r, x: model.init(r, x, is_training=True),
      jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert not state  # NF models keep no state
  return {m: {n: tuple(v.shape) for n, v in leaves.items()}
          for m, leaves in params.items()}


# ------------------------------------------------------------- structure


def test_table_and_image_sizes_are_the_released_ones():
  assert list(nf_regnet.VARIANTS) == list(RELEASED_TABLE)
  for variant, row in RELEASED_TABLE.items():
    mine = nf_regnet.VARIANTS[variant]
    assert (mine.widths, mine.depths, mine.train_image_size,
            mine.test_image_size, mine.dropout_rate) == row
    for name in (f"nf_regnet_{variant.lower()}", f"nf_regnet_{variant}_nows"):
      assert models.image_sizes(name.lower()) == row[2:4]
  with pytest.raises(ValueError, match="valid: B0, B1"):
    nf_regnet.parse_variant("B9")


@pytest.mark.parametrize("variant", list(RELEASED_PARAMS))
def test_parameter_counts_match_the_released_code(variant):
  assert _count(_released_tree(variant)) == RELEASED_PARAMS[variant]


@pytest.mark.parametrize("variant", ["B0", "B8"])
def test_parameter_tree_is_the_released_one(variant):
  # Paths, names, shapes; other variants differ only in their table row.
  assert _shapes(f"nf_regnet_{variant.lower()}") == _released_tree(variant)


def test_options():
  assert models.model_options("nf_regnet_b3")["group_width"] == 8
  with pytest.raises(ValueError, match="narrower than the group width"):
    _shapes("nf_regnet_b0", width_multiplier=0.1)
  with pytest.raises(ValueError, match="depths must be 4"):
    _shapes("nf_regnet_b0", depths=(1, 1, 1))


# ------------------------------------------------------ signal propagation


def test_expected_variance_grows_by_alpha_squared_and_resets():
  # ICLR 2021, Sec. 4: block j of a stage sees Var(h) = 1 + j * alpha^2;
  # a stage's first block sees the previous stage's last output.
  betas = lambda net: ([b.beta for b in net.blocks], net.block_stages)
  got, stages = hk.transform(
      lambda: betas(nf_regnet.NFRegNet(variant="B0"))).apply({}, None)
  depths = RELEASED_TABLE["B0"][1]
  expected = []
  for s, depth in enumerate(depths):
    first = 1.0 if s == 0 else 1 + depths[s - 1] * ALPHA**2
    expected += [first] + [1 + j * ALPHA**2 for j in range(1, depth)]
  assert stages == [s for s, d in enumerate(depths) for _ in range(d)]
  np.testing.assert_allclose(got, 1 / np.sqrt(expected), rtol=1e-12)


_SMALL = dict(width_multiplier=0.25, drop_path_rate=0.0)


def test_each_stage_measures_one_plus_j_alpha_squared():
  """Each stage's blocks on an input of the variance they expect.

  A transition's shortcut is a 2x2 average pool and a WS 1x1 conv of the
  normalised input: on inputs constant over 2x2 windows (as images nearly
  are) that gives unit variance, so each stage restarts at 1 and each
  block adds alpha^2 (block outputs: 1 + (j + 1) * alpha^2).
  """
  depths = (2, 3, 3, 2)
  in_widths = [int(w * 0.25) for w in (48, 48, 104, 208)]  # B0's, x0.25
  in_vars = [1.0] + [1 + d * ALPHA**2 for d in depths[:-1]]
  keys = jax.random.split(jax.random.PRNGKey(42), 4)
  inputs = [jnp.repeat(jnp.repeat(jax.random.normal(key, (16, 8, 8, ch)) *
                                  np.sqrt(var), 2, axis=1), 2, axis=2)
            for key, ch, var in zip(keys, in_widths, in_vars)]

  def stages(xs):
    xs = list(xs)
    net = nf_regnet.NFRegNet(variant="B0", depths=depths, **_SMALL)
    variances = [[] for _ in depths]
    for block, stage in zip(net.blocks, net.block_stages):
      xs[stage], _ = block(xs[stage], is_training=False)
      variances[stage].append(layers.signal_metrics(xs[stage])[1])
    return [jnp.stack(v) for v in variances]

  f = hk.transform(stages)  # init and apply in one program: one compile
  got = fast_jit(lambda r, xs: f.apply(set_skip_gains(f.init(r, xs)), None,
                                       xs))(jax.random.PRNGKey(0), inputs)
  # Over 8 seeds: within 7% of the law, each block adding 0.7 to 1.3 alpha^2.
  for depth, variances in zip(depths, got):
    np.testing.assert_allclose(
        variances, 1 + (np.arange(depth) + 1) * ALPHA**2, rtol=0.1)
    assert np.all(np.abs(np.diff(variances) / ALPHA**2 - 1) < 0.5), variances


def test_network_signal_propagation_on_white_noise():
  """The model's metrics on a spatially white Gaussian batch.

  As for the NFNet (test_model_numerics.py), the transitions' average pool
  of 4 independent values leaves each stage at about a fifth of where the
  last ended. In a stage each block adds about alpha^2 * res_var; at these
  widths a random branch's covariance with its input (~1 / channels) moves
  that by as much again (0.4 to 2.3 times over 8 seeds). WS keeps means 0.
  """
  model = models.build_model("nf_regnet_b0", depths=(2, 2, 2, 2), **_SMALL)
  images = jax.random.normal(jax.random.PRNGKey(42), (16, 64, 64, 3))

  @fast_jit
  def measure(rng, x):
    params, state = model.init(rng, x[:1], is_training=True)
    return params["NF_RegNet/~/linear"]["w"], model.apply(
        set_skip_gains(params), state, None, x, is_training=False,
        return_metrics=True)[0][1]

  classifier, metrics = measure(jax.random.PRNGKey(0), images)
  np.testing.assert_array_equal(classifier, 0)  # zero-initialised
  m = {k: np.asarray(v) for k, v in metrics.items()}
  np.testing.assert_array_equal(m["stage"], [0, 0, 1, 1, 2, 2, 3, 3])
  var = m["avg_var"]
  # (Stage 3, at 2x2 pixels, has too few samples to resolve its growth.)
  growth = (var[1::2] - var[::2])[:3]
  added = ALPHA**2 * m["res_var"][1::2][:3]
  assert np.all((growth > 0.25 * added) & (growth < 4 * added)), m
  ratios = var[2::2] / var[1:-1:2]
  assert np.all((ratios > 0.1) & (ratios < 0.4)), var
  assert m["avg_sq_mean"].max() < 0.01 * var.max()


# ------------------------------------------------- the block, transcribed

_BETA, _DROP_RATE, _GROUP = 0.8, 0.5, 8


def _ws_conv(p, x, stride=1, groups=1):
  w, fan_in = p["w"], np.prod(p["w"].shape[:-1])
  var = jnp.maximum(jnp.var(w, axis=(0, 1, 2)) * fan_in, 1e-4)
  kernel = p["gain"] * (w - jnp.mean(w, axis=(0, 1, 2))) / jnp.sqrt(var)
  out = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  return out + p["bias"]


def _released_block(params, x, stride, keep_mask):
  """The released `NFBlock.__call__`, step by step (widening blocks are
  strided in NF-RegNets, so its stride-1 projection case is left out)."""
  p = lambda name: params[f"block/~/{name}"]
  silu = lambda x: jax.nn.silu(x) * 1.7881293296813965
  out = silu(x) * _BETA
  shortcut = x
  if stride > 1:
    shortcut = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
    shortcut = _ws_conv(p("conv_shortcut"), shortcut)
  out = _ws_conv(p("conv0"), out)
  out = _ws_conv(p("conv1"), silu(out), stride,
                 p("conv1")["w"].shape[-1] // _GROUP)
  se0, se1 = p("squeeze_excite/~/linear"), p("squeeze_excite/~/linear_1")
  hidden = jax.nn.relu(jnp.mean(out, axis=(1, 2)) @ se0["w"] + se0["b"])
  gate = jax.nn.sigmoid(hidden @ se1["w"] + se1["b"])
  out = _ws_conv(p("conv2"), silu(2 * gate[:, None, None, :] * out))
  out = out * keep_mask  # StochDepth without scale_by_keep
  return out * params["block"]["skip_gain"] * ALPHA + shortcut


# A stage's first block (strided, widening; expansion 1 in the network's
# first block) and the others (identity shortcut). No block of the network
# widens without a stride.
@pytest.mark.parametrize("in_ch,out_ch,stride,expansion", [
    (16, 24, 2, 1.0), (24, 24, 1, 2.25)])
def test_block_matches_the_released_block(in_ch, out_ch, stride, expansion):
  f = hk.transform(lambda x: nf_regnet.NFRegNetBlock(
      in_ch, out_ch, stride=stride, expansion=expansion, group_width=_GROUP,
      se_ratio=0.5, beta=_BETA, alpha=ALPHA,
      activation=layers.scaled_activation("silu"), drop_rate=_DROP_RATE,
      standardize=True, name="block")(x, is_training=True)[0])
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, in_ch))
  params = fast_jit(f.init)(jax.random.PRNGKey(1), x)
  # A non-zero skip gain and non-trivial gains and biases, so that every
  # factor reaches the output and the gradients.
  noise = np.random.default_rng(2)
  params = jax.tree.map(
      lambda v: v + 0.3 * noise.standard_normal(v.shape, np.float32), params)
  params["block"]["skip_gain"] = jnp.asarray(0.7)
  rng = jax.random.PRNGKey(3)
  # The block's only random draw is its stochastic-depth mask.
  mask_key = hk.transform(hk.next_rng_key).apply({}, rng)
  keep_mask = jax.random.bernoulli(mask_key, 1 - _DROP_RATE,
                                   (8, 1, 1, 1)).astype(jnp.float32)
  assert 0 < float(keep_mask.sum()) < 8  # Both cases occur.

  released = lambda p, x: _released_block(p, x, stride, keep_mask)
  ours = lambda params, x: f.apply(params, rng, x)
  cotangent = jax.random.normal(jax.random.PRNGKey(4),
                                (8, 8 // stride, 8 // stride, out_ch))

  def outputs_and_gradients(params, x):
    loss = lambda fn: lambda p, v: jnp.sum(fn(p, v) * cotangent)
    return [(fn(params, x), jax.grad(loss(fn), argnums=(0, 1))(params, x))
            for fn in (ours, released)]

  (got, got_grads), (want, want_grads) = fast_jit(outputs_and_gradients)(
      params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_remat_recomputes_each_block_with_the_same_parameters():
  # `common.apply_blocks`' hk.remat (gradients: test_model_numerics.py)
  # wraps every block; the parameter tree stays the same.
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  trees, remats = [], []
  for remat in (False, True):
    model = models.build_model("nf_regnet_b0", num_classes=10, remat=remat,
                               depths=(1, 2, 1, 1), **_SMALL)
    params, state = jax.eval_shape(
        lambda r, m=model: m.init(r, x, is_training=True),
        jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, m=model: jnp.sum(
        m.apply(p, state, None, jnp.zeros(x.shape), is_training=False)[0])))(
            params)
    trees.append(jax.tree.map(jnp.shape, params))
    remats.append(sum(e.primitive.name == "remat2" for e in jaxpr.jaxpr.eqns))
  assert trees[0] == trees[1] and remats == [0, 5]


# ----------------------------------------------------------------- config

IMAGENET_TRAIN = 1_281_167


def _released_warmup_cosine(itr, peak, low, total, warmup):
  """The released `optim.WarmupCosineDecay` with start 0, in numpy."""
  warm = peak * (itr / warmup)
  cos = 1 + np.cos(np.pi * (itr - warmup) / (total - warmup))
  return warm if not warmup < itr else 0.5 * (peak - low) * cos + low


def test_b0_config_is_the_released_recipe():
  c = regnet_config.get_config("variant=B0")
  k, d, o = c.model.kwargs, c.dataset, c.optimizer
  assert c.model.name == "nf_regnet_b0"
  assert (k.width_multiplier, k.expansion, k.group_width, k.se_ratio,
          k.alpha, k.activation) == (0.75, 2.25, 8, 0.5, 0.2, "silu")
  assert (k.drop_path_rate, k.dropout_rate, k.fc_init_std) == (0.1, 0.2, 0)
  assert (d.image_size, d.eval_image_size, d.eval_preproc, d.mixup_alpha,
          d.cutmix_alpha, d.mixup_or_cutmix, d.randaugment_layers) == (
              192, 224, "crop_resize", 0.2, 1.0, False, 0)
  assert (c.batch_size, c.num_epochs, c.label_smoothing) == (1024, 360, 0.1)
  assert (o.name, o.momentum, o.nesterov, o.weight_decay, o.agc_clipping,
          o.sam_rho) == ("sgd", 0.9, True, 5e-5, 0.0, 0.0)
  assert (o.base_lr, o.scale_lr_by_batch, o.min_lr, o.warmup_epochs) == (
      0.4, False, 0.001, 5.0)
  assert (c.ema.decay, c.ema.warmup, c.precision, c.eval_precision) == (
      0.99999, True, "float32", "float32")
  # AGC off: the optimizer chain is weight decay and SGD only.
  assert len(optim.make_optimizer(c, lambda _: 0.0).init(
      {"m": {"w": jnp.zeros((2, 2))}})) == 2


def test_weight_decay_per_variant():
  # The released table (B0-B5); B6-B8 continue `5e-5 + 1e-5 * level`.
  released = {"B0": 5e-5, "B1": 6e-5, "B2": 7e-5, "B3": 8e-5, "B4": 9e-5,
              "B5": 1e-4, "B6": 1.1e-4, "B7": 1.2e-4, "B8": 1.3e-4}
  for variant, decay in released.items():
    c = regnet_config.get_config(f"variant={variant}")
    assert c.optimizer.weight_decay == pytest.approx(decay, rel=1e-12)
    assert c.model.name == f"nf_regnet_{variant.lower()}"
  sweep = regnet_config.get_sweep()
  assert [r["optimizer.weight_decay"] for r in sweep] == pytest.approx(
      list(released.values()))
  with pytest.raises(ValueError, match="unknown NF-RegNet variant"):
    regnet_config.get_config("variant=B9")


def test_schedule_is_the_released_one_and_not_scaled_by_batch():
  c = regnet_config.get_config()
  total, warmup = optim.training_steps(c, IMAGENET_TRAIN), 5 * 1251.1396484375
  assert total == IMAGENET_TRAIN * 360 // 1024 == 450_410
  schedule = optim.learning_rate_schedule(c, total, IMAGENET_TRAIN / 1024)
  for itr in (0, 1, 3000, 6255, 6256, 6257, 100_000, 300_000, 450_409,
              450_410):
    want = _released_warmup_cosine(float(itr), 0.4, 0.001, total, warmup)
    assert float(schedule(itr)) == pytest.approx(want, rel=1e-5), itr
  assert float(schedule(total)) == pytest.approx(0.001, rel=1e-5)
  # The peak (at 5 epochs of 1000 steps) stays 0.4 at any batch size; the
  # NFNet configs scale theirs.
  c.batch_size = 4096
  peak = lambda: float(optim.learning_rate_schedule(c, 10**6, 1000)(5000))
  assert peak() == pytest.approx(0.4)
  c.optimizer.scale_lr_by_batch = True
  assert peak() == pytest.approx(6.4)


def test_smoke_config_is_a_tiny_digits_run():
  c = regnet_config.get_config("smoke=True")
  experiment_config.validate(c)
  assert (c.model.name, c.dataset.name) == ("nf_regnet_b0", "digits")
  assert c.model.kwargs.depths == (1, 1, 1, 1)
  c.optimizer.min_lr = -1.0
  with pytest.raises(ValueError, match="min_lr must be >= 0"):
    experiment_config.validate(c)
