"""Helpers shared by the model tests: cheap compiles and small inits."""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models

ALPHA = 0.2  # The NF residual scale (ICLR 2021, Sec. 4; the released code).

# Small but structurally complete configs: every block type appears, with
# non-transition blocks in the stages where the variance is still large.
NFNET_SMALL = dict(width_multiplier=0.25, group_width=16, depths=(2, 2, 1, 1))
NF_RESNET_SMALL = dict(width_multiplier=0.25)


@functools.cache
def fast_compile_options():
  """XLA:CPU options that halve compile times here, or {} if unsupported.

  LLVM optimization level 0 and the classic (non-"fusion emitter") kernels
  compile 2-3x faster; the programs run a little slower, which is cheap at
  these sizes. Another XLA may not know the flags: then compile normally.
  """
  options = {"xla_backend_optimization_level": 0,
             "xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except jax.errors.JaxRuntimeError:
    return {}
  return options


def fast_jit(fn):
  return jax.jit(fn, compiler_options=fast_compile_options())


def abstract_init(name, image_size=32, **overrides):
  """(params, state) of a model as shapes: traced, nothing allocated or
  compiled (parameter counts and trees of full-size models)."""
  model = models.build_model(name, **overrides)
  return jax.eval_shape(
      functools.partial(model.init, is_training=True),
      jax.ShapeDtypeStruct((2,), jnp.uint32),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


def abstract_params(name, **overrides):
  """The params of `abstract_init`."""
  return abstract_init(name, **overrides)[0]


def random_params(name, **overrides):
  """Random params of a model as numpy, made without compiling: N(1, 1)
  each (seeded: the same every call)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: np.asarray(rng.standard_normal(s.shape) + 1.0, np.float32),
      abstract_params(name, **overrides))


def init_model(name, seed=0, **overrides):
  """Real (params, state); parameters do not depend on the image size."""
  model = models.build_model(name, **overrides)
  init = fast_jit(lambda rng, x: model.init(rng, x, is_training=True))
  return init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))


def set_skip_gains(params, value=1.0):
  """Sets every `skip_gain` (init 0, which hides the residual branches)."""
  return hk.data_structures.map(
      lambda m, n, v: jnp.full_like(v, value) if n == "skip_gain" else v,
      params)
