"""Where training progress goes: `metrics.jsonl`, TensorBoard, optionally Weights & Biases
(`config.writers.wandb`), and a progress line.

The work directory may be local or a `gs://` (any `etils.epath`) URI. Object stores have no
append: on a local disk `metrics.jsonl` is appended to and flushed line by line; on `gs://`
the writer keeps the file's lines in memory (read back once when it starts, so a resumed run
continues the same file) and uploads the whole file after every logged step. A GCS upload
replaces the object atomically, so a reader or a killed process never sees a torn file; the
cost is one small upload per logged step (a few MB at most for long runs; raise
`log_every_steps` if that matters). gs:// needs `pip install -e '.[gcs]'` (gcsfs for the
files, google-cloud-storage for tensorboardX's event-file writer).
"""
import hashlib
import io
import json
import os
import sys
import time
from typing import Any, Mapping

import ml_collections
import numpy as np
from etils import epath

from mmjax import errors, retry

METRICS_FILE = "metrics.jsonl"


def is_remote(path: str | os.PathLike) -> bool:
  """True for `gs://...` and other URI work directories (no append, no rename-over)."""
  return "://" in os.fspath(path)


class MetricWriter:
  """Writes one JSON object per logged step to `<workdir>/metrics.jsonl` and the same scalars
  (and images) to TensorBoard under `<workdir>/tensorboard`. Only the writing process
  (process 0) writes: with `enabled=False` every method is a no-op."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               retrier: retry.Retrier | None = None,
               config: ml_collections.ConfigDict | None = None):
    """`config`: the run's config; with `writers.wandb` the same metrics and pictures also
    go to a Weights & Biases run, which gets the config."""
    self.enabled = enabled
    self.retrier = retrier or retry.Retrier()
    self._tb = self._wandb = None
    if not enabled:
      return
    if config is not None and config.writers.wandb:
      self._wandb = start_wandb(workdir, config)
    root = epath.Path(workdir)
    self._remote = is_remote(root)
    self._path = root / METRICS_FILE
    root.mkdir(parents=True, exist_ok=True)
    if self._remote:
      self._lines = _read_lines(self._path) if self._path.exists() else []
      if self._lines and not self._lines[-1].endswith("\n"):
        self._lines[-1] += "\n"
      self._jsonl = None
    else:
      self._jsonl = self._path.open("a")
    from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    # gs:// goes through tensorboardX's own GCS writer (google-cloud-storage), which uploads
    # the whole event file on every flush: there it flushes every 120 s (its flush_secs) and
    # on close instead of after every write.
    self._tb = SummaryWriter(os.fspath(root / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: _to_python(v) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), **scalars}) + "\n"
    if self._remote:
      self._lines.append(line)
      self._upload()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    numbers = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
    for key, value in numbers.items():
      self._tb.add_scalar(key, value, step)
    self._flush_tb()
    if self._wandb is not None:
      self._wandb.log(numbers, step=int(step))

  def _upload(self) -> None:
    """Replaces the object in one upload; transient store errors are retried, and if the
    store stays down the lines wait in memory for the next upload."""
    text = "".join(self._lines)
    try:
      self.retrier.call(lambda: self._path.write_text(text), f"upload of {self._path}")
    except Exception as e:
      if not retry.is_transient(e):
        raise
      print(f"warning: {self._path} not uploaded ({e}); the next logged step uploads it",
            file=sys.stderr, flush=True)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self.enabled:
      self._tb.add_image(tag, image, step, dataformats="HWC")
      self._flush_tb()
      if self._wandb is not None:
        import wandb
        self._wandb.log({tag: wandb.Image(image)}, step=int(step))

  def _flush_tb(self) -> None:
    if not self._remote:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      # On gs:// closing uploads the event file: retried (a failed close keeps its writers
      # and the next try uploads the whole file again).
      self.retrier.call(self._tb.close, "TensorBoard event file upload")
      if self._wandb is not None:
        self._wandb.finish()


def start_wandb(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> Any:
  """A W&B run for `workdir` (`config.writers`): resumed if one with its id exists, the
  config attached; local work directories also hold W&B's files (`<workdir>/wandb`)."""
  try:
    import wandb
  except ImportError:
    raise errors.UsageError("config writers.wandb=True needs the wandb package: pip install "
                            "-e '.[wandb]' (or set writers.wandb=False)") from None
  w = config.writers
  path = os.path.abspath(os.fspath(workdir)) if not is_remote(workdir) else os.fspath(workdir)
  run_id = hashlib.sha256(path.encode()).hexdigest()[:16]
  return wandb.init(
      project=w.wandb_project, entity=w.wandb_entity or None,
      name=w.wandb_name or os.path.basename(path.rstrip("/")), id=run_id, resume="allow",
      config=config.to_dict(), mode=w.wandb_mode or None,
      dir=None if is_remote(workdir) else path)


def truncate_metrics(workdir: str | os.PathLike, step: int) -> None:
  """On resume, drops metrics.jsonl lines logged after the checkpointed `step` (they are
  recomputed identically) and a torn last line left by a killed process, so the file reads
  as if the run had never been interrupted. Local or gs://."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return
  lines = _read_lines(path)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      break  # a torn write can only be the last line
    if not line.endswith("\n") or record.get("step", 0) > step:
      break
    kept.append(line)
  if len(kept) == len(lines):
    return
  if is_remote(path):
    path.write_text("".join(kept))  # an object upload is atomic
  else:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)  # atomic: a kill here leaves the old or the new file


def _read_lines(path: epath.Path) -> list[str]:
  return io.StringIO(path.read_text(), newline="\n").readlines()


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
