"""Reading a function's jaxpr: design checks without a GPU."""

import jax
import jax.extend


def find_eqns(fn, name: str, *args) -> list:
  """Each `name` operation (a jaxpr equation: `.params`, `.invars`) that
  `fn(*args)` traces to, nested jaxprs included, in trace order."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == name:
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
