"""Reading a function's jaxpr: design checks without a GPU."""

import jax
import jax.extend


def primitive_params(fn, name: str, *args) -> list[dict]:
  """The params of each `name` operation `fn(*args)` traces to, nested
  jaxprs included, in trace order."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == name:
        found.append(eqn.params)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def count_primitive(fn, name: str, *args) -> int:
  """How many `name` operations `fn(*args)` traces to, nested jaxprs included.

  On GPUs every reduction becomes at least one kernel launch, so tests use
  this to check that reductions do not multiply with the number of leaves or
  layers.
  """
  return len(primitive_params(fn, name, *args))
