"""Fast paths of the models and the step, each beside its plain twin.

- `conv`: a polyphase input gradient for strided grouped convolutions;
  plain: XLA's gradient.
- `standardize`: Scaled WS with one-pass moments and a closed-form VJP;
  plain: the two-pass formula, differentiated by JAX.
- `recompute`: activations recomputed from their input in the backward
  pass; plain: JAX's autodiff, which stores the intermediates.
- `norms`: AGC's unit norms and the gradient norm, reduced per group of
  same-shaped leaves; plain: one reduction per leaf.
- `layout`: gradients materialized row-major behind a barrier before the
  update; plain: left as XLA lays them out.

`switch.fast_paths(enabled)` picks one side for everything traced inside
it (`--config.fast_paths` in the trainer, `--plain` in the benchmarks).
Both sides compute the same values to float tolerance (tests/test_ops.py).
"""

from nfnets.ops.switch import fast_paths
from nfnets.ops.switch import fast_paths_enabled
