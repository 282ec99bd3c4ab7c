"""Where training progress goes: `metrics.jsonl`, TensorBoard and a progress line."""
import json
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


class MetricWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and writes the
  same scalars (and images) to TensorBoard. Only the writing process (process 0) writes."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: _to_python(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for key, value in scalars.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self.enabled:
      self._tb.add_image(tag, image, step, dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class Progress:
  """`step 120/600  loss 2.314  812.3 ex/s  ETA 3m02s` lines on stdout."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._start_time = time.time()
    self._start_step = start_step

  def line(self, step: int, metrics: Mapping[str, Any]) -> str:
    done = step - self._start_step
    elapsed = time.time() - self._start_time
    eta = elapsed / done * (self.total_steps - step) if done else float("nan")
    parts = [f"step {step}/{self.total_steps}"]
    for key in ("loss", "contrastive_loss", "caption_loss", "examples_per_sec", "mfu"):
      if key in metrics:
        parts.append(f"{key.replace('examples_per_sec', 'ex/s')} {float(metrics[key]):.4g}")
    parts.append(f"ETA {format_seconds(eta)}")
    return "  ".join(parts)

  def print(self, step: int, metrics: Mapping[str, Any]) -> None:
    print(self.line(step, metrics), flush=True, file=sys.stdout)


def format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  return f"{minutes}m{secs:02d}s"
