"""Checksums of a checkpoint's files, written when it commits, checked on read.

Orbax checks a checkpoint's structure, not its array data: a flipped byte in
a data file restores without a word. Each save therefore writes
`checksums.json` into its step folder, listing the size and SHA-256 of every
file the save wrote, before the folder is committed (renamed to its final
name), so a committed checkpoint always carries its checksums. One file is
left out: orbax's step record `_CHECKPOINT_METADATA` (item names and
timestamps), which orbax rewrites as it commits; the arrays' own metadata
(`state/_METADATA`, the OCDBT manifests) is covered. Every read
(resume, `--mode=eval`, `init_from`, `predict.py`) checks them first.

A step folder without `checksums.json` was written before checksums existed
(or had it deleted): it is read unverified, with a warning.
"""

import hashlib
import json
import os
from typing import Optional

MANIFEST = "checksums.json"
# Rewritten by orbax after the checksums are taken (its commit timestamp).
_UNCHECKED = (MANIFEST, "_CHECKPOINT_METADATA")
_CHUNK = 8 << 20


def file_sha256(path: str) -> str:
  """The SHA-256 of a file, read in chunks (hashlib releases the GIL)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
  """Every file under `step_dir` but `_UNCHECKED`, relative, sorted."""
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in _UNCHECKED:
        found.append(rel)
  return sorted(found)


def write_manifest(step_dir: str) -> None:
  """Records the size and SHA-256 of every file in `step_dir`."""
  files = {}
  for rel in _files(step_dir):
    path = os.path.join(step_dir, rel)
    files[rel] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
  temporary = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(temporary, "w") as f:
    json.dump({"algorithm": "sha256", "files": files}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, os.path.join(step_dir, MANIFEST))


def has_manifest(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, MANIFEST))


def first_mismatch(step_dir: str) -> Optional[str]:
  """The first file of `step_dir` that does not match its checksums, in words.

  Args:
    step_dir: a checkpoint's step folder holding a `checksums.json`.

  Returns:
    None if every listed file has its recorded size and SHA-256; else, e.g.,
    "state/ocdbt.process_0/d/0a1b... has a different SHA-256 than recorded".
  """
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      listed = [(rel, int(entry["size"]), str(entry["sha256"]))
                for rel, entry in sorted(json.load(f)["files"].items())]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
  for rel, size, sha256 in listed:
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f"{rel} is missing"
    if os.path.getsize(path) != size:
      return f"{rel} has {os.path.getsize(path)} bytes, {size} recorded"
    if file_sha256(path) != sha256:
      return f"{rel} has a different SHA-256 than recorded"
  return None
