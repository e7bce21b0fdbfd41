"""Counting operations in a function's jaxpr: design checks without a GPU."""

import jax
import jax.extend


def count_primitive(fn, name: str, *args) -> int:
  """How many `name` operations `fn(*args)` traces to, nested jaxprs included.

  On GPUs every reduction becomes at least one kernel launch, so tests use
  this to check that reductions do not multiply with the number of leaves or
  layers.
  """
  def count(jaxpr):
    return sum((eqn.primitive.name == name) +
               sum(count(sub) for sub in
                   jax.extend.core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)
  return count(jax.make_jaxpr(fn)(*args).jaxpr)
