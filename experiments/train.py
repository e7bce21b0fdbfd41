"""Trains and evaluates an experiment config.

  python experiments/train.py --config=configs/<family>.py[:args] \
      --workdir=DIR [--mode=train|eval|train_eval] [--config.x=...]

With no flags at all it trains the bundled default (configs/digits.py) in a
new temporary workdir and says where. Config overrides are locked: a key that
does not exist is an error. A bad command line is one line on stderr,
`error: bad command line: ...`, and exit status 2; a config the trainer
refuses (or a run that fails: NaN loss, unreadable data) is `error: ...` and
status 1. `load_config(argv)` is the config half of the command line, for
tests and notebooks.
"""

import logging as std_logging
import os
import re
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

# Runnable from a clone without installing: the repo root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets.training import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import experiment_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.training import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
    "digits.py")
_CONFIG = None  # the command line's config, set by _parse_flags
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints and metrics go here; default: a new "
    "temporary directory.")
_MODE = flags.DEFINE_enum("mode", "train", experiment_config.MODES,
                          "train, eval or train_eval.")


def _one_line(error: BaseException) -> str:
  text = str(error).replace("\\n", " ").replace("\\'", "'")
  text = " ".join(text.split()).strip("'\"")
  if "Traceback (most recent call last)" in text:
    # A config file's own exception, wrapped with its traceback: keep the
    # exception line.
    text = text[text.rfind(" ", 0, text.rfind("Error: ")) + 1:]
  return text


def _config_file(argv) -> str:
  """The `--config` value on a command line (absl: the last one wins)."""
  spec = _DEFAULT_CONFIG
  for i, arg in enumerate(argv[1:], 1):
    name, sep, value = arg.partition("=")
    if name in ("-config", "--config"):
      spec = value if sep else (argv[i + 1] if i + 1 < len(argv) else spec)
  return spec


def _unknown_override(argv) -> str | None:
  """The first `--config.x` override of a key the config lacks, explained.

  config_flags says only the key ('nope'); this names where it is missing
  and the valid keys there. None if the config does not load on its own (its
  own error is then the one to report) or every override exists.
  """
  paths = [m.group(1) for m in
           (re.match(r"^--?(?:no)?config\.([^=]+)", a) for a in argv[1:])
           if m]
  if not paths:
    return None
  try:
    # The config as its file builds it, without the overrides.
    config = load_config([argv[0], f"--config={_config_file(argv)}"])
  except ValueError:
    return None
  for path in paths:
    message = experiment_config.missing_key(config, path)
    if message:
      return message
  return None


def _command_line_message(error: BaseException, argv) -> str:
  """One line saying what is wrong with a command line's config flags."""
  message = _one_line(error)
  cause = error.__cause__ or error.__context__
  if cause is not None and "earlier failure" in message:
    message = _one_line(cause)
  chain, link = [], error
  while link is not None and len(chain) < 8:
    chain.append(link)
    link = link.__cause__ or link.__context__
  if any(isinstance(e, KeyError) for e in chain):
    # An override of a key that does not exist (the config is locked).
    message = _unknown_override(argv) or message
  return message


def _is_config_arg(arg: str) -> bool:
  return bool(re.match(r"^--?(?:no)?config(?:[.=]|$)", arg))


def _split_config_args(argv) -> tuple[list[str], list[str]]:
  """(the --config flags, the rest), each after argv[0]."""
  config_args, rest, i = [], [], 1
  while i < len(argv):
    arg = argv[i]
    if _is_config_arg(arg):
      config_args.append(arg)
      # `--config FILE` or `--config.key VALUE` (a boolean override stands
      # alone: the next word is then another flag, as the script takes no
      # positional arguments).
      takes_next = ("=" not in arg and not arg.lstrip("-").startswith("no")
                    and i + 1 < len(argv) and not argv[i + 1].startswith("-"))
      if takes_next:
        i += 1
        config_args.append(argv[i])
    else:
      rest.append(arg)
    i += 1
  return config_args, rest


def load_config(argv) -> ml_collections.ConfigDict:
  """The locked config that a command line's `--config*` flags give.

  Args:
    argv: a command line (argv[0] first); flags other than `--config`
      (`--config=FILE[:ARGS]`, default configs/digits.py) and its
      `--config.key=value` overrides are ignored.

  Returns:
    The config, locked: setting a key it does not have is an error.

  Raises:
    ValueError: one line saying what is wrong (an unknown key, with the valid
      ones; a missing config file; a bad config arg).
  """
  config_args, _ = _split_config_args(argv)
  flag_values = flags.FlagValues()
  try:
    # config_flags defines a flag per override it finds in sys_argv here.
    holder = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Experiment config file[:args].",
        flag_values=flag_values, lock_config=True,
        sys_argv=[argv[0], *config_args])
    flag_values([argv[0], *config_args])
    config = holder.value
    config.lock()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(_command_line_message(e, argv)) from None
  return config


def _parse_flags(argv):
  """app.run's parser: the config on its own flags, then the rest."""
  global _CONFIG
  config_args, rest = _split_config_args(argv)
  try:
    _CONFIG = load_config([argv[0], *config_args])
    return flags.FLAGS([argv[0], *rest])
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: bad command line: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries:
  """Drops INFO lines from orbax (it logs every file write) and JAX start-up."""

  def filter(self, record) -> bool:
    return (record.levelno >= std_logging.WARNING or
            not any(name in record.pathname
                    for name in ("orbax", "xla_bridge")))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="nfnets-")
  logging.info("workdir: %s", workdir)
  try:
    results = loop.train_and_evaluate(config, workdir, _MODE.value)
  except (ValueError, checkpoint.CheckpointSaveError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if "eval_ema_top1" in results:
    print(f"test accuracy: {results['eval_ema_top1']:.4f} (EMA weights), "
          f"{results['eval_top1']:.4f} (raw weights) on "
          f"{int(results['eval_examples'])} examples; workdir: {workdir}")
  elif "preempted" in results:
    print(f"preempted at step {results['preempted']}; checkpoint saved in "
          f"{workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
