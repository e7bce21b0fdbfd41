"""Reading a function's jaxpr: design checks without a GPU."""

import jax
import jax.extend


def find_eqns(fn, name, *args) -> list:
  """Each `name` operation (a jaxpr equation: `.params`, `.invars`) that
  `fn(*args)` traces to, nested jaxprs included, in trace order.

  `name` is a primitive's name or a tuple of names (one trace for all).
  """
  names = (name,) if isinstance(name, str) else tuple(name)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in names:
        found.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  # A new function object each time: JAX caches traces by function, and a
  # cached trace would not see a change of `nfnets.ops.fast_paths`.
  walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)
  return found


def count_primitive(fn, name: str, *args) -> int:
  """How many `name` operations `fn(*args)` traces to, nested jaxprs included.

  On GPUs every reduction becomes at least one kernel launch, so tests use
  this to check that reductions do not multiply with the number of leaves or
  layers.
  """
  return len(find_eqns(fn, name, *args))
