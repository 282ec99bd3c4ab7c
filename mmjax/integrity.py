"""Checkpoint integrity: a committed step whose files were cut is never restored.

Orbax commits a step atomically (a temporary directory renamed, or a commit marker on object
stores), so a save killed half way is invisible. What that cannot catch is damage after the
commit: a copy of a work directory cut short, a file system that lost data, a file deleted by
hand. So once a step is committed, process 0 seals it: `<step>/mmjax_files.json` lists every
file of the step with its size. Before the checkpoints are opened, the newest steps are
checked against their lists; a step with a file missing or of another size is moved aside to
`<workdir>/incomplete_checkpoints/<step>` (kept for inspection, out of Orbax's way) and the
restore takes the previous one. A step without a list (written by an older mmjax, or killed
between its commit and its seal) is trusted as Orbax committed it.
"""
from __future__ import annotations

import json
import sys
import time

from etils import epath

MANIFEST = "mmjax_files.json"
ASIDE = "incomplete_checkpoints"


def _files(directory: epath.Path, prefix: str = "") -> dict[str, int]:
  """{path relative to the step: size} of every file under `directory` but the manifest."""
  out = {}
  for path in directory.iterdir():
    name = prefix + path.name
    if path.is_dir():
      out.update(_files(path, name + "/"))
    elif name != MANIFEST:
      out[name] = path.stat().length
  return out


def seal(step_dir: epath.Path) -> None:
  """Writes the list of the committed step's files and sizes (in one piece: an object
  upload, or a local file renamed into place, so a reader never sees half a list)."""
  text = json.dumps({"files": _files(step_dir)}, sort_keys=True)
  if "://" in str(step_dir):
    (step_dir / MANIFEST).write_text(text)
  else:
    partial = step_dir / (MANIFEST + ".partial")
    partial.write_text(text)
    partial.rename(step_dir / MANIFEST)


def problem(step_dir: epath.Path) -> str | None:
  """What is wrong with a sealed step ('state/x: missing'), or None (whole, or unsealed)."""
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return None
  try:
    expected = json.loads(manifest.read_text())["files"]
  except (ValueError, KeyError):
    return f"{MANIFEST}: unreadable"
  found = _files(step_dir)
  for name, size in sorted(expected.items()):
    if name not in found:
      return f"{name}: missing"
    if found[name] != size:
      return f"{name}: {found[name]} bytes, {size} when committed"
  return None


def set_aside_incomplete(checkpoint_dir: str, steps: list[int]) -> list[int]:
  """Moves aside the newest steps that fail their check, newest first, until one passes;
  prints one line per step moved. Returns the steps moved."""
  directory = epath.Path(checkpoint_dir)
  moved = []
  for step in sorted(steps, reverse=True):
    wrong = problem(directory / str(step))
    if wrong is None:
      break
    aside = directory.parent / ASIDE / f"{step}-{int(time.time())}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    (directory / str(step)).rename(aside)
    moved.append(step)
    earlier = [s for s in steps if s < step]
    then = f"step {max(earlier)}" if earlier else "no checkpoint (a fresh start)"
    print(f"warning: checkpoint step {step} in {checkpoint_dir} is incomplete ({wrong}); "
          f"moved to {aside}; restoring {then} instead", file=sys.stderr, flush=True)
  return moved
