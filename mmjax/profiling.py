"""A `jax.profiler` trace of a window of training steps (`config.profile`).

  python -m mmjax.train ... --config.profile.start_step=10 --config.profile.num_steps=5
  tensorboard --logdir <workdir>/profile        # the Profile tab (tensorboard-plugin-profile)

The trace covers the steps start_step, ..., start_step + num_steps - 1 that this run
executes (step s is the update from state step s to s + 1, i.e. `train_step` call number
s + 1; on a resumed run steps before the restored one are not run). Each step is marked
with `jax.profiler.StepTraceAnnotation("train", step_num=s)`, which the profile plugin's
step-time views read. Files: `<workdir>/profile/plugins/profile/<date>/<host>.xplane.pb`
(+ a Perfetto `.trace.json.gz`), one per process, on any backend.
"""
import os
from typing import Any, Callable

import jax
import ml_collections


class StepProfiler:
  """Starts the trace before the window's first step, stops it after its last one."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.first = config.profile.start_step
    self.end = self.first + config.profile.num_steps  # exclusive; num_steps 0 = off
    self.log_dir = os.path.join(workdir, "profile")
    self.active = False

  def run(self, step: int, train_step: Callable[..., Any], *args: Any) -> Any:
    """`train_step(*args)` as train step `step`, traced when in the window. After the
    window's last step its outputs are waited for, so their device work is in the trace."""
    if self.first <= step < self.end and not self.active:
      jax.profiler.start_trace(self.log_dir)
      self.active = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      out = train_step(*args)
    if step == self.end - 1:
      self.stop(out)
    return out

  def stop(self, wait_for: Any = None) -> None:
    """Ends the trace if one is running (also on preemption or errors inside the window)."""
    if self.active:
      jax.block_until_ready(wait_for)
      jax.profiler.stop_trace()
      self.active = False
