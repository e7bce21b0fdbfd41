"""DeepMind's released NFNet weights: read safely, check, convert, export.

The released `F0_haiku.npz` ... `F6_haiku.npz` are, despite the extension,
pickles (written with dill in 2021) of a Haiku params mapping
`{module_path: {param_name: float32 array}}`, possibly wrapped in container
classes of that era's Haiku (`FlatMapping`) that no longer exist. They are read
here without dill and without executing code: a restricted unpickler admits
only numpy arrays, dtypes and mapping containers, including the forms in which
dill writes arrays (numpy's `_reconstruct` reached through dill's
`_import_module` and `_get_attr` up to dill 0.3.4, `_create_array` from dill
0.3.6 on). `save_safe` writes a plain `.npz` of named arrays that `load` then
reads with no unpickling at all, and `save_released` writes any params tree
back in the released pickle layout.
"""

import _compat_pickle
import io
import os
import pickle
from typing import Any, Mapping

import numpy as np

Params = dict[str, dict[str, np.ndarray]]

# Separates module path and parameter name in the keys of a safe .npz.
_KEY_SEP = ":"
_ZIP_MAGIC = b"PK\x03\x04"

# numpy 1.x names its array module numpy.core, numpy 2 numpy._core; pickle
# writes the public module, dill the extension module that defines the function.
_NUMPY_ARRAY_MODULES = {
    f"numpy.{core}.{module}" for core in ("core", "_core")
    for module in ("multiarray", "_multiarray_umath")
}
_NUMPY_GLOBALS = {
    (m, n) for m in _NUMPY_ARRAY_MODULES for n in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}
_DILL_MODULES = ("dill._dill", "dill.dill")
# Mapping containers of old and current Haiku and the standard library.
_MAPPING_GLOBALS = {
    ("haiku._src.data_structures", "FlatMapping"),
    ("haiku._src.data_structures", "FlatMap"),
    ("haiku._src.data_structures", "frozendict"),
    ("haiku.data_structures", "FlatMapping"),
    ("collections", "OrderedDict"),
    ("builtins", "dict"),
}


class _Mapping(dict):
  """Stands in for any admitted mapping class while unpickling."""

  def __init__(self, *args, **kwargs):
    if len(args) == 1 and isinstance(args[0], Mapping):
      super().__init__(args[0], **kwargs)
    elif not args:
      super().__init__(**kwargs)
    else:
      raise pickle.UnpicklingError(
          "a mapping container was pickled in an unknown layout")

  def __setstate__(self, state):
    # Old Haiku containers kept their items in a private attribute.
    if isinstance(state, tuple) and state:
      state = state[0]
    if isinstance(state, Mapping):
      for private in ("_storage", "_mapping", "_dict"):
        if isinstance(state.get(private), Mapping):
          state = state[private]
          break
      self.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
  """Admits numpy arrays and mappings; refuses every other global."""

  def find_class(self, module: str, name: str):
    return _admitted_global(module, name)


def _admitted_global(module: str, name: str):
  """What a pickle's reference to `module.name` loads as, if admitted."""
  # Protocol 0-2 pickles name Python 2 modules (copy_reg, __builtin__).
  if (module, name) in _compat_pickle.NAME_MAPPING:
    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
  module = _compat_pickle.IMPORT_MAPPING.get(module, module)
  if (module, name) in _NUMPY_GLOBALS:
    if name == "_reconstruct":
      return _reconstruct
    if name == "scalar":
      return _scalar
    return getattr(np, name)
  if module in _DILL_MODULES and name in _DILL_GLOBALS:
    return _DILL_GLOBALS[name]
  if (module, name) in _MAPPING_GLOBALS:
    return _Mapping
  if (module, name) == ("copyreg", "_reconstructor"):
    return _reconstructor_of_mapping
  if (module, name) == ("_codecs", "encode"):
    return _latin1_bytes  # how protocol 0-2 pickles store bytes
  if (module, name) == ("builtins", "object"):
    return object  # the reconstructor's base-class argument; inert
  raise pickle.UnpicklingError(
      f"refusing to unpickle {module}.{name}: only numpy arrays and "
      "mappings are allowed (unpickling other objects can run code)")


def _reconstruct(cls, shape, dtype):
  del cls  # always a plain ndarray
  return np.ndarray.__new__(np.ndarray, shape, dtype)


class _ModuleName(str):
  """A module named by dill's `_import_module`, not imported."""


# dill (0.3.4 and older) pickles a C function, such as numpy's
# `_reconstruct` or `_codecs.encode`, as `_get_attr(_import_module(m), name)`.
_DILL_IMPORTABLE = {
    m for m, _ in _NUMPY_GLOBALS | _MAPPING_GLOBALS} | {"_codecs"}


def _dill_import_module(name, safe=False):
  del safe
  if name not in _DILL_IMPORTABLE:
    raise pickle.UnpicklingError(f"refusing to import {name}: only numpy's "
                                 "array modules and mappings are allowed")
  return _ModuleName(name)


def _dill_get_attr(module, name):
  if not isinstance(module, _ModuleName):
    raise pickle.UnpicklingError(f"refusing to get {name} from {module!r}")
  return _admitted_global(module, name)


def _dill_create_array(constructor, args, state, npdict=None):
  """dill >= 0.3.6's array record: numpy's `_reconstruct`, then its state."""
  if constructor is not _reconstruct or npdict:
    raise pickle.UnpicklingError("refusing an array record of dill that is "
                                 "not a plain numpy array")
  array = constructor(*args)
  array.__setstate__(state)
  return array


_DILL_GLOBALS = {
    "_import_module": _dill_import_module,
    "_get_attr": _dill_get_attr,
    "_create_array": _dill_create_array,
}


def _reconstructor_of_mapping(cls, base, state):
  """copyreg's default-reduce hook, for the admitted mapping classes only."""
  del base, state
  if cls is not _Mapping:
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
  return _Mapping()


def _latin1_bytes(text, encoding="utf-8"):
  if encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"refusing to encode bytes as {encoding!r}")
  return text.encode("latin1")


def _scalar(dtype, data):
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _as_params(tree: Any, path: str) -> Params:
  """Checks that an unpickled object is {module: {name: array}}."""
  if not isinstance(tree, Mapping) or not tree:
    raise ValueError(f"{path} is not a params tree: expected a mapping of "
                     f"module paths, got {type(tree).__name__}")
  params = {}
  for module, leaves in tree.items():
    if not isinstance(module, str) or not isinstance(leaves, Mapping):
      raise ValueError(f"{path} is not a params tree: entry {module!r} is "
                       "not a module path with a mapping of parameters")
    params[module] = {}
    for name, value in leaves.items():
      if not isinstance(value, (np.ndarray, np.generic)):
        raise ValueError(f"{path} is not a params tree: {module}/{name} is "
                         f"a {type(value).__name__}, not an array")
      params[module][str(name)] = np.asarray(value)
  return params


def load(path: str) -> Params:
  """Reads released weights (pickle) or a safe `.npz` from `save_safe`.

  Args:
    path: a local file; nothing is downloaded.

  Returns:
    {module_path: {param_name: numpy array}}.

  Raises:
    ValueError: missing, truncated or foreign files, and pickles holding
      anything but arrays and mappings.
  """
  if not os.path.isfile(path):
    raise ValueError(f"weights file {path} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  if data[:4] == _ZIP_MAGIC:
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        flat = {key: npz[key] for key in npz.files}
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a readable .npz ({e})") from None
    params: Params = {}
    for key, value in flat.items():
      module, sep, name = key.rpartition(_KEY_SEP)
      if not sep:
        raise ValueError(f"{path}: key {key!r} is not 'module{_KEY_SEP}name'"
                         "; was it written by save_safe?")
      params.setdefault(module, {})[name] = value
    return params
  try:
    tree = _RestrictedUnpickler(io.BytesIO(data)).load()
  except pickle.UnpicklingError as e:
    if str(e).startswith("refusing"):
      raise ValueError(f"{path}: {e}") from None
    raise ValueError(f"{path} is truncated or not a params pickle ({e})"
                     ) from None
  except (EOFError, ValueError, TypeError, IndexError, AttributeError) as e:
    raise ValueError(f"{path} is truncated or not a params pickle "
                     f"({type(e).__name__}: {e})") from None
  return _as_params(tree, path)


def save_safe(params: Mapping[str, Mapping[str, Any]], path: str) -> None:
  """Writes params as an `.npz` of named arrays (read without unpickling)."""
  flat = {f"{module}{_KEY_SEP}{name}": np.asarray(value)
          for module, leaves in params.items()
          for name, value in leaves.items()}
  with open(path, "wb") as f:
    np.savez(f, **flat)


def save_released(params: Mapping[str, Mapping[str, Any]], path: str) -> None:
  """Writes params in the released layout: a pickle of plain nested dicts.

  Other ports load these with `np.load(path, allow_pickle=True)` or
  `pickle.load`, as they load DeepMind's files.
  """
  tree = {module: {name: np.asarray(value, np.float32)
                   for name, value in leaves.items()}
          for module, leaves in params.items()}
  with open(path, "wb") as f:
    pickle.dump(tree, f, protocol=4)


def check_fits(params: Mapping[str, Mapping[str, Any]],
               expected: Mapping[str, Mapping[str, Any]], source: str,
               skip: tuple[str, ...] = ()) -> None:
  """Raises ValueError naming the first module whose params do not fit.

  Args:
    params: loaded params.
    expected: the model's params (arrays or ShapeDtypeStructs).
    source: where `params` came from, for the message.
    skip: module paths not compared (e.g. a classifier to re-initialise).
  """
  for module in sorted(set(expected) | set(params)):
    if module in skip:
      continue
    want = {k: tuple(np.shape(v)) for k, v in expected.get(module, {}).items()}
    have = {k: tuple(np.shape(v)) for k, v in params.get(module, {}).items()}
    if want != have:
      raise ValueError(
          f"{source} does not fit the model: module {module!r} has "
          f"{have or 'nothing'} there, the model needs {want or 'nothing'}")
