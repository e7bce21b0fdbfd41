"""Parameter and multiply-add counts of a model, without allocating it.

MACs are counted from the shapes of the convolutions and matrix products in
the traced forward pass (`jax.make_jaxpr` on abstract inputs), the convention
of the NFNet paper's GMACs column: elementwise work, pooling and the weight
standardization itself are not counted.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models


def count_params(params: Any) -> int:
  """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    dims = eqn.params["dimension_numbers"]
    # Each output element takes (kernel spatial size x input features per
    # group) multiply-adds.
    kernel_in = rhs.shape[dims.rhs_spec[1]]
    kernel_spatial = math.prod(rhs.shape[d] for d in dims.rhs_spec[2:])
    del lhs
    return math.prod(out.shape) * kernel_in * kernel_spatial
  if name == "dot_general":
    lhs = eqn.invars[0].aval
    (contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval
    return math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
  return 0


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _jaxpr_macs(sub)
  return total


def summarize(name: str, image_size: int | None = None,
              **overrides) -> dict[str, Any]:
  """Counts parameters and forward GMACs of one image at `image_size`.

  Args:
    name: a registered model name.
    image_size: square input resolution; default the model's test size.
    **overrides: model options (e.g. `num_classes`).

  Returns:
    {'model', 'params', 'gmacs', 'image_size'}.
  """
  if image_size is None:
    image_size = models.image_sizes(name)[1]
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  model = models.build_model(name, **overrides)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  params, state = jax.eval_shape(
      lambda r, x: model.init(r, x, is_training=True), rng, images)
  jaxpr = jax.make_jaxpr(
      lambda p, s, x: model.apply(p, s, None, x, is_training=False))(
          params, state, images)
  macs = _jaxpr_macs(jaxpr.jaxpr)
  return {"model": name, "params": count_params(params),
          "gmacs": float(np.round(macs / 1e9, 4)), "image_size": image_size}
