"""Gradients in the parameters' own memory layout before the update.

XLA keeps a conv kernel's gradient in the layout cuDNN writes it in (OHWI,
not the parameters' HWIO) and fuses the transpose into the weight update,
which then cannot run in place: it writes new buffers and copies them into
the donated state (74 more kernels and 0.5 GB per F0 step on a GPU, counted
by `benchmarks/kernel_census.py`). The fast path materializes flat views
behind an optimization barrier, which are row-major by definition, so the
update reads gradients laid out like the parameters. The plain twin
(`nfnets.ops.switch`) leaves the layout to XLA. The values are untouched.
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from nfnets.ops import switch


def in_default_layout(tree: Any) -> Any:
  """The leaves of `tree`, materialized row-major (fast path) or as is."""
  if not switch.fast_paths_enabled():
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  flat = lax.optimization_barrier([jnp.ravel(x) for x in leaves])
  return jax.tree.unflatten(
      treedef, [f.reshape(jnp.shape(x)) for f, x in zip(flat, leaves)])
