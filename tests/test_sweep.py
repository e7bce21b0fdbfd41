"""experiments/sweep.py: printed commands, a tiny local sweep, skipping."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(*flags):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_dry_run_prints_the_agc_batch_sweep(tmp_path):
  result = _sweep("--config=configs/nf_resnet.py", f"--workdir_root={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 25  # 5 batch sizes x 5 clipping thresholds
  first = lines[0]
  assert "experiments/train.py --config=configs/nf_resnet.py" in first
  assert (f"--workdir={tmp_path}/batch_size=256,optimizer.agc_clipping=0.01"
          in first)
  assert first.endswith("--config.batch_size=256 "
                        "--config.optimizer.agc_clipping=0.01")
  assert lines[-1].endswith("--config.batch_size=4096 "
                            "--config.optimizer.agc_clipping=0.16")
  assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_variants_sweep_and_bad_sweeps(tmp_path):
  result = _sweep("--config=configs/nfnet.py:sweep=variants",
                  f"--workdir_root={tmp_path}", "--", "--config.batch_size=8")
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 8
  assert ("--config.model.name=nfnet_f3 --config.dataset.image_size=320 "
          "--config.dataset.eval_image_size=416" in lines[3])
  assert all(line.endswith("--config.batch_size=8") for line in lines)
  bad = _sweep("--config=configs/resnet.py", f"--workdir_root={tmp_path}")
  assert bad.returncode != 0 and "defines no get_sweep" in bad.stderr


def test_tiny_sweep_runs_what_is_not_finished_and_a_rerun_skips_all(
    tmp_path):
  # seed=1 is marked finished beforehand (done.json, as a finished run
  # writes it): the sweep trains seed=0 only; run again, it trains nothing.
  # The run's flags are test_train_cli's: its programs come from the
  # persistent compilation cache when that test compiled them first.
  os.makedirs(tmp_path / "seed=1")
  (tmp_path / "seed=1" / "done.json").write_text("{}")
  flags = ["--config=configs/digits.py:seeds=2", f"--workdir_root={tmp_path}",
           "--run", "--", "--config.num_steps=12", "--config.batch_size=32",
           "--config.checkpoint.every_steps=4", "--config.log_every_steps=1",
           "--config.eval_batch_size=360", "--config.fast_paths=False"]
  first = _sweep(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["seed=0", "seed=1"]
  assert os.path.exists(tmp_path / "seed=0" / "done.json")
  assert os.path.isdir(tmp_path / "seed=0" / "checkpoints")
  assert os.listdir(tmp_path / "seed=1") == ["done.json"]
  assert first.stdout.count("finished already") == 1
  assert "sweep done: 2 runs" in first.stdout
  again = _sweep(*flags)
  assert again.returncode == 0
  assert again.stdout.count("finished already") == 2
