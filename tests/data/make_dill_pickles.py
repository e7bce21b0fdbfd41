"""Writes the dill pickles of `test_released_weights.py` (run by hand).

DeepMind's released NFNet weights (2021) were written with dill, which
pickles numpy arrays in forms plain pickle never writes. These small files
hold `params_tree()` as dill wrote it then and as dill writes it now:

  dill 0.3.3 with numpy 1.26 (numpy.core), protocols 2, 3 and 4:
    numpy's _reconstruct through dill._dill._get_attr and _import_module;
  dill 0.4.1 with numpy 2.4 (numpy._core), protocol 4:
    dill._dill._create_array.

Run with those versions first on sys.path, e.g.
  pip install --target /tmp/old 'dill==0.3.3' 'numpy==1.26.4'
  PYTHONPATH=/tmp/old python tests/data/make_dill_pickles.py
  pip install --target /tmp/new 'dill==0.4.1' 'numpy==2.4.6'
  PYTHONPATH=/tmp/new python tests/data/make_dill_pickles.py
"""

import os

import numpy as np


def params_tree():
  """A small Haiku-style params tree: conv kernel, bias, 0-d gain, scalar."""
  def values(*shape):
    return (np.arange(np.prod(shape), dtype=np.float32) / 8 - 1).reshape(shape)
  return {
      "NFNet/~/stem_conv0": {"w": values(3, 3, 3, 4), "b": values(4)},
      "NFNet/~/nf_block_0": {"skip_gain": np.asarray(0.25, np.float32),
                             "scale": np.float32(1.5)},
      "NFNet/~/linear": {"w": values(4, 5), "b": np.zeros(5, np.float32)},
  }


def main():
  import dill  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  numpy_major_minor = ".".join(np.__version__.split(".")[:2])
  protocols = (2, 3, 4) if dill.__version__.startswith("0.3.") else (4,)
  for protocol in protocols:
    name = (f"dill-{dill.__version__}_numpy-{numpy_major_minor}_"
            f"protocol{protocol}.pkl")
    with open(os.path.join(here, name), "wb") as f:
      dill.dump(params_tree(), f, protocol=protocol)
    print("wrote", name)


if __name__ == "__main__":
  main()
