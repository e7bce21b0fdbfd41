"""Sums GPU kernel time by kernel name from a Perfetto/Chrome JSON trace.

  python benchmarks/kernel_times.py TRACE.json.gz [--top=40] [--steps=3]

Reads the trace that `benchmarks/benchmark.py --trace_dir` writes and prints the
kernels that take the most device time per step, grouped by name, with their
share of the total: where a training step's time goes.
"""

import argparse
import collections
import gzip
import json
import re


def kernel_events(trace: dict):
  """Yields (name, duration_us) of the events on GPU stream threads."""
  threads = {}
  for event in trace.get("traceEvents", []):
    if event.get("ph") == "M" and event.get("name") == "thread_name":
      threads[(event["pid"], event["tid"])] = event["args"]["name"]
  for event in trace.get("traceEvents", []):
    if event.get("ph") != "X":
      continue
    thread = threads.get((event.get("pid"), event.get("tid")), "")
    if re.search(r"stream", thread, re.IGNORECASE):
      yield event["name"], float(event.get("dur", 0.0))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace")
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  opener = gzip.open if args.trace.endswith(".gz") else open
  with opener(args.trace, "rt") as f:
    trace = json.load(f)
  totals = collections.Counter()
  counts = collections.Counter()
  for name, dur in kernel_events(trace):
    totals[name] += dur
    counts[name] += 1
  total = sum(totals.values())
  if not total:
    raise SystemExit("error: no GPU stream events found in the trace")
  print(f"device time per step: {total / args.steps / 1e3:.2f} ms in "
        f"{sum(counts.values()) // args.steps} kernels")
  for name, dur in totals.most_common(args.top):
    print(f"{dur / args.steps / 1e3:8.3f} ms {100 * dur / total:5.1f}% "
          f"x{counts[name] // args.steps:<4d} {name[:110]}")


if __name__ == "__main__":
  main()
