"""The one switch between the fast paths and their plain twins.

Each module of `nfnets.ops` has a fast path, chosen from kernel counts on
GPUs, and a plain twin that computes the same values with the plain
formula and JAX's own differentiation. Which one runs is decided when a
function is traced, by `fast_paths_enabled()`; the default is the fast
paths.

The trainer's steps (`nfnets.training.steps`) trace their whole body under
`fast_paths(config.fast_paths)`, so `--config.fast_paths=False` gives a step
made only of plain formulas. Elsewhere, set it around the first call of a
jitted function (the call that traces it): a function that is already
compiled keeps the paths it was traced with.
"""

import contextlib
import contextvars
from typing import Iterator

_FAST_PATHS = contextvars.ContextVar("nfnets_fast_paths", default=True)


def fast_paths_enabled() -> bool:
  """Whether the code being traced now takes the fast paths."""
  return _FAST_PATHS.get()


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
  """Within the block, trace the fast paths (True) or the plain twins."""
  if not isinstance(enabled, bool):
    raise ValueError(f"fast_paths must be True or False, got {enabled!r}")
  token = _FAST_PATHS.set(enabled)
  try:
    yield
  finally:
    _FAST_PATHS.reset(token)
