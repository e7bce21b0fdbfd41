"""Times the strided grouped convolutions of an NFNet, forward and backward.

  python benchmarks/bench_conv.py [--variant=F0] [--batch_size=256]
      [--image_size=192] [--steps=20] [--json]

For each strided grouped 3x3 convolution of the network (conv1 of the first
block of stages 2-4), in bfloat16, times the forward pass and the gradients
with respect to input and kernel two ways: with `nfnets.ops.conv.conv2d` (the
models' convolution: polyphase input gradient) and with
`lax.conv_general_dilated` differentiated by XLA (which convolves a
zero-interleaved output gradient). Prints milliseconds per call and the
ratio; MACs per call count the forward and both gradients (3x forward).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

# Runnable from a checkout that is not installed (the GPU machine's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nfnets.models import nfnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.ops import conv  # pylint: disable=g-import-not-at-top,wrong-import-position

_VARIANT = flags.DEFINE_string("variant", "F0", "NFNet variant (widths).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 192, "Square input resolution.")
_GROUP_WIDTH = flags.DEFINE_integer("group_width", 128, "Channels per group.")
_WIDTH_MULTIPLIER = flags.DEFINE_float("width_multiplier", 1.0,
                                       "Stage width multiplier.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls per measurement.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def strided_grouped_convs(variant: str, image_size: int, group_width: int,
                          width_multiplier: float) -> list[dict]:
  """Input size, channels and groups of each strided grouped conv."""
  _, widths = nfnet.parse_variant(variant)
  size = image_size // 4  # after the stem
  convs = []
  for width, stride in zip(widths, nfnet.STRIDES):
    mid = nfnet.bottleneck_width(int(width * width_multiplier), group_width)
    if stride > 1:
      convs.append({"size": size, "channels": mid,
                    "groups": mid // group_width})
    size = -(-size // stride)
  return convs


def _time(fn, *args) -> float:
  """Median milliseconds per call over rounds of back-to-back calls."""
  jax.block_until_ready(fn(*args))
  rounds = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / _STEPS.value * 1e3)
  return float(np.median(rounds))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    specs = strided_grouped_convs(_VARIANT.value, _IMAGE.value,
                                  _GROUP_WIDTH.value, _WIDTH_MULTIPLIER.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if not specs or min(s["groups"] for s in specs) < 1:
    raise SystemExit(f"error: no strided grouped convolution at width "
                     f"multiplier {_WIDTH_MULTIPLIER.value} and group width "
                     f"{_GROUP_WIDTH.value}")
  rows = []
  for spec in specs:
    size, ch, groups = spec["size"], spec["channels"], spec["groups"]
    x = jnp.ones((_BATCH.value, size, size, ch), jnp.bfloat16)
    kernel = jnp.ones((3, 3, ch // groups, ch), jnp.bfloat16) * 0.01
    row = dict(spec, batch_size=_BATCH.value, macs=3 * _BATCH.value * (
        -(-size // 2)) ** 2 * ch * 9 * (ch // groups))
    for name, fn in (("polyphase", conv.conv2d), ("xla", conv.xla_conv2d)):
      loss = lambda a, b, f=fn: jnp.sum(  # pylint: disable=g-long-lambda
          f(a, b, (2, 2), groups).astype(jnp.float32))
      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      row[f"{name}_ms"] = round(_time(step, x, kernel), 3)
    row["xla_over_polyphase"] = round(row["xla_ms"] / row["polyphase_ms"], 3)
    rows.append(row)
  result = {"variant": _VARIANT.value, "image_size": _IMAGE.value,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "convs": rows}
  if _JSON.value:
    print(json.dumps(result))
    return
  print(f"{result['device']}, jax {result['jax']}, NFNet-{_VARIANT.value} "
        f"at {_IMAGE.value} px, batch {_BATCH.value}, bfloat16")
  print(f"{'input':>12} {'groups':>6} {'GMACs':>7} {'polyphase ms':>13} "
        f"{'XLA ms':>8} {'XLA/poly':>8}")
  for r in rows:
    print(f"{r['size']:>4}x{r['size']}x{r['channels']:<4} {r['groups']:>6} "
          f"{r['macs'] / 1e9:7.1f} {r['polyphase_ms']:13.3f} "
          f"{r['xla_ms']:8.3f} {r['xla_over_polyphase']:8.3f}")


if __name__ == "__main__":
  app.run(main)
