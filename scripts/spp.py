"""Signal Propagation Plots (SPPs) of models at initialization.

  python scripts/spp.py --models=nf_resnet50,resnet50,nf_resnet50_nows \
      [--out=spp.png] [--batch_size=8] [--image_size=224] \
      [--width_multiplier=...] [--group_width=...] [--skip_gain_one] [--seed=0]

For each model: initialise it, set every `skip_gain` to 1 (they start at 0,
which makes each block its shortcut and would hide the residual branches), run
one forward pass on a unit Gaussian batch and record, per residual block, the
average channel squared mean and variance of the block output and the average
channel variance at the end of the residual branch (Brock, De, Smith, ICLR
2021, Sec. 3). Writes a three-panel PNG and the same numbers as a CSV next to
it (same stem, `.csv`).
"""

import csv
import os
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# Runnable from a clone without installing: the repo root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets import models  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODELS = flags.DEFINE_list(
    "models", ["nf_resnet50", "resnet50", "nf_resnet50_nows"],
    "Comma-separated registered model names, one line each in the plot.")
_OUT = flags.DEFINE_string(
    "out", "spp.png", "PNG to write; the CSV goes next to it (.csv).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images in the batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution.")
_WIDTH_MULTIPLIER = flags.DEFINE_float(
    "width_multiplier", None,
    "Scales every model's stage widths. Default: each model's own (1 for "
    "most; 0.75 of the table's widths for NF-RegNets).")
_GROUP_WIDTH = flags.DEFINE_integer(
    "group_width", None,
    "Group width of NFNet (nfnet_*) models only; lower it (e.g. 16) with a "
    "small --width_multiplier. Default: the model's own (128).")
_SKIP_GAIN_ONE = flags.DEFINE_bool(
    "skip_gain_one", True,
    "Set every skip_gain (in timm-tree models, each zero-initialised "
    "conv gain) to 1 so the residual branches contribute.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and input.")

METRICS = ("avg_sq_mean", "avg_var", "res_var")
TITLES = ("Average channel squared mean", "Average channel variance",
          "Residual branch average variance")
CSV_COLUMNS = ("model", "block", "stage") + METRICS
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def overrides_for(name: str, width_multiplier: float | None,
                  group_width: int | None) -> dict[str, object]:
  """Model options for an SPP: no stochastic depth or dropout at all.

  Args:
    name: registered model name.
    width_multiplier: stage width multiplier, or None for the model's own.
    group_width: NFNet group width, or None for the model's default.

  Returns:
    Keyword overrides for `models.build_model`.
  """
  # Stochastic depth would zero whole branches for some examples and skew
  # the statistics, so every model gets both rates at 0.
  overrides = {"drop_path_rate": 0.0, "dropout_rate": 0.0}
  if width_multiplier is not None:
    overrides["width_multiplier"] = width_multiplier
  if group_width is not None and name.startswith(("nfnet_", "eca_nfnet_")):
    overrides["group_width"] = group_width
  return overrides


def measure(name: str, images: jax.Array, rng: jax.Array, *,
            skip_gain_one: bool, **overrides) -> dict[str, np.ndarray]:
  """Per-block signal metrics of one freshly initialised model.

  Args:
    name: registered model name.
    images: the input batch [N, S, S, 3].
    rng: key for the parameters (and BN's training-mode pass).
    skip_gain_one: set every `skip_gain`, and every conv `gain` that init
      left at zero, to 1 before the pass.
    **overrides: options for `models.build_model`.

  Returns:
    Arrays `avg_sq_mean`, `avg_var`, `res_var` and `stage`, one entry per
    residual block.

  Raises:
    ValueError: an unknown model or an option the model rejects.
  """
  model = models.build_model(name, **overrides)
  init_rng, apply_rng = jax.random.split(rng)
  # Parameter shapes depend on neither batch nor resolution, so one image
  # suffices. Init is random-number code that runs once, so it is compiled
  # without XLA's expensive passes: they triple its compile time (the bulk of
  # a small model's run) and save nothing measurable.
  init = jax.jit(lambda r, x: model.init(r, x, is_training=True))
  params, state = init.lower(init_rng, images[:1]).compile(
      compiler_options=_FAST_COMPILE)(init_rng, images[:1])
  if skip_gain_one:
    # timm-tree models (nfnet_light, nf_resnet_timm) have no skip_gain: the
    # gain of each branch's last conv starts at zero instead.
    params = hk.data_structures.map(
        lambda _, n, v: jnp.ones_like(v) if n == "skip_gain" or (
            n == "gain" and not v.any()) else v, params)
  # Only the BN baseline has state. Its SPP uses training-mode BN (batch
  # statistics, as at the start of training): in eval mode its freshly
  # initialised moving averages (mean 0, var 1) would not normalise at all.
  # The NF models run in eval mode, which needs no rng.
  is_training = bool(jax.tree.leaves(state))
  apply = jax.jit(lambda p, s, r, x: model.apply(
      p, s, r, x, is_training, return_metrics=True))
  (_, metrics), _ = apply(params, state,
                          apply_rng if is_training else None, images)
  return {k: np.asarray(v) for k, v in metrics.items()}


def write_csv(path: pathlib.Path,
              results: dict[str, dict[str, np.ndarray]]) -> None:
  """Writes one row per model and block with the CSV_COLUMNS."""
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for name, metrics in results.items():
      for block, stage in enumerate(metrics["stage"]):
        writer.writerow([name, block, int(stage)] +
                        [f"{float(metrics[m][block]):.6g}" for m in METRICS])


def stage_transitions(stages: np.ndarray) -> list[float]:
  """x positions between blocks where the stage index changes."""
  return [i - 0.5 for i in range(1, len(stages)) if stages[i] != stages[i - 1]]


def plot(path: pathlib.Path, results: dict[str, dict[str, np.ndarray]],
         title: str) -> None:
  """Draws the three SPP panels side by side and saves them as a PNG."""
  # Agg renders without a display (servers, CI); select it before pyplot.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(15, 5))
  transitions = sorted({x for m in results.values()
                        for x in stage_transitions(m["stage"])})
  for i, (ax, metric, panel_title) in enumerate(zip(axes, METRICS, TITLES)):
    for name, metrics in results.items():
      ax.plot(np.arange(len(metrics[metric])), metrics[metric], marker=".",
              label=name)
    for x in transitions:
      ax.axvline(x, color="gray", linestyle=":", linewidth=1)
    values = np.concatenate([m[metric] for m in results.values()])
    positive = values[values > 0]
    # Without WS the mean shift and variance grow by orders of magnitude, so
    # the first two panels are log scale; the branch variance panel only when
    # its values span more than 20x.
    if positive.size and (i < 2 or positive.max() > 20 * positive.min()):
      ax.set_yscale("log")
      # Plain numbers ("0.01", "3") read faster than 10^k or 3x10^0.
      ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.set_title(panel_title)
    ax.set_xlabel("Residual block (dotted: stage transitions)")
    ax.grid(True, which="major", alpha=0.3)
  axes[0].set_ylabel("Value at initialization")
  # One legend under all panels: inside a panel it hides some line.
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels),
             frameon=False)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  names = _MODELS.value
  if not names:
    raise app.UsageError("--models needs at least one model name")
  try:
    if _BATCH_SIZE.value < 1 or _IMAGE_SIZE.value < 1:
      raise ValueError("batch_size and image_size must be positive")
    for name in names:  # fail before any model runs
      models.get_constructor(name)
    key = jax.random.PRNGKey(_SEED.value)
    data_rng, model_rng = jax.random.split(key)
    size = _IMAGE_SIZE.value
    images = jax.random.normal(data_rng, (_BATCH_SIZE.value, size, size, 3))
    results = {}
    for name in names:
      results[name] = measure(
          name, images, model_rng, skip_gain_one=_SKIP_GAIN_ONE.value,
          **overrides_for(name, _WIDTH_MULTIPLIER.value, _GROUP_WIDTH.value))
  except ValueError as e:
    # The first line carries the message; JAX may append tracing notes.
    raise SystemExit(f"error: {str(e).splitlines()[0]}") from None

  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  csv_path = out.with_suffix(".csv")
  write_csv(csv_path, results)
  width = ("default width" if _WIDTH_MULTIPLIER.value is None
           else f"width x{_WIDTH_MULTIPLIER.value:g}")
  title = (f"Signal propagation at initialization: unit Gaussian input "
           f"{_BATCH_SIZE.value}x{size}x{size}x3, {width}, skip_gain="
           f"{1 if _SKIP_GAIN_ONE.value else 0}")
  plot(out, results, title)
  for name, m in results.items():
    print(f"{name}: {len(m['stage'])} blocks, avg_var "
          f"{m['avg_var'].min():.3g}..{m['avg_var'].max():.3g}, avg_sq_mean "
          f"{m['avg_sq_mean'].min():.3g}..{m['avg_sq_mean'].max():.3g}")
  print(f"wrote {out} and {csv_path}")


if __name__ == "__main__":
  app.run(main)
