"""Fast paths of the models and the step, each beside its plain twin.

| module | fast path | plain twin |
|---|---|---|
| `conv` | polyphase input gradient of strided grouped convs | XLA's gradient |
| `standardize` | one-pass moments, closed-form VJP | autodiff of the formula |
| `recompute` | activations recomputed from their input in the backward pass | autodiff (stores intermediates) |
| `norms` | AGC and gradient norms reduced per group of same-shaped leaves | one reduction per leaf |
| `layout` | gradients materialized row-major behind a barrier | as XLA lays them out |

`switch.fast_paths(enabled)` picks one side for everything traced inside
it (`--config.fast_paths` in the trainer, `--plain` in the benchmarks).
Both sides compute the same values to float tolerance (tests/test_ops.py).
"""

from nfnets.ops.switch import fast_paths
from nfnets.ops.switch import fast_paths_enabled
