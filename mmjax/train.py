"""Trains a model from a config; rerunning the same command resumes from the last checkpoint.

  python -m mmjax.train --config configs/shapes.py --workdir /tmp/mmjax_shapes \
      [--config.total_steps=1000 ...]

Multi-process: auto-detected on TPU pods and SLURM; on one machine pass
`--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I` (see launch/).
"""
import collections
import os
import signal
import sys
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app
from jax.experimental import multihost_utils

from mmjax import checkpoint, cli, evaluate, models, sharding, state as state_lib, step as step_lib
from mmjax import tokenizer as tokenizer_lib
from mmjax import writers
from mmjax.data import pipeline
from mmjax.optimizer import make_optimizer, make_schedule

PREEMPTED_EXIT_CODE = 42


class NonFiniteLossError(FloatingPointError):
  pass


class Preemption:
  """Set by SIGTERM (single process) or JAX's preemption notice (multi-process, where every
  process must agree on the step, so the coordination service decides)."""

  def __init__(self):
    self._signalled = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled


def device_batches(batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
                   size: int) -> Iterator[dict[str, jax.Array]]:
  """Keeps `size` batches in flight to the devices so the host never stalls the step."""
  queue = collections.deque()
  for local in batches:
    queue.append(sharding.global_batch(local, mesh))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def is_due(step: int, every: int, total: int) -> bool:
  return step == total or (every > 0 and step % every == 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs training to `config.total_steps`; returns the last logged metrics and eval results."""
  process0 = jax.process_index() == 0
  # Mesh, data, model.
  mesh = sharding.make_mesh(config)
  tokenizer = tokenizer_lib.get_tokenizer(config)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise cli.ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but config "
                          f"model.text.vocab_size={config.model.text.vocab_size}")
  model = models.build_model(config)
  optimizer, schedule = make_optimizer(config), make_schedule(config)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  writer = writers.MetricWriter(workdir, enabled=process0)
  preemption = Preemption()

  with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
    # Shard: abstract state first, then created or restored directly onto its shardings.
    abstract, shardings = state_lib.abstract_state(model, optimizer, config, mesh)
    latest = checkpointer.latest_step()
    start_step = latest or 0
    if latest is not None:  # includes step 0, e.g. a converted checkpoint to fine-tune
      state = checkpointer.restore(start_step, abstract)
      if process0:
        print(f"Resumed from {checkpointer.directory} at step {start_step}", flush=True)
    else:
      state = state_lib.create_state(model, optimizer, config, shardings)
    train_step = step_lib.jit_train_step(
        step_lib.StepFns(model, optimizer, schedule, config, mesh), shardings, mesh)
    evaluators = evaluate.build_evaluators(config, tokenizer) if config.eval_every_steps else []
    embedder = evaluate.Embedder(model, mesh, config.evals.batch_size)
    batches = device_batches(pipeline.make_train_iterator(
        config, tokenizer, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count()), mesh, config.data.prefetch_batches)

    # Loop. Metrics are fetched one step late, so the host never waits on the step in flight.
    progress = writers.Progress(config.total_steps, start_step)
    pending, last, results = None, {}, {}
    skipped_total, timer = 0, (time.time(), start_step)
    for step in range(start_step, config.total_steps):
      state, metrics = train_step(state, next(batches))
      done = step + 1
      if pending is not None:
        last, skipped_total, timer = _handle_metrics(*pending, config, writer, progress,
                                                     skipped_total, timer)
      pending = (done, metrics)
      preempted = preemption.reached(done)
      if preempted or is_due(done, config.checkpoint_every_steps, config.total_steps):
        checkpointer.save(done, state, config, force=preempted)
      if preempted:
        checkpointer.wait()
        raise SystemExit(PREEMPTED_EXIT_CODE)
      if evaluators and is_due(done, config.eval_every_steps, config.total_steps):
        # Log this step before evaluating, so evaluation time is not counted as training time.
        last, skipped_total, timer = _handle_metrics(*pending, config, writer, progress,
                                                     skipped_total, timer)
        pending = None
        results = evaluate.run_evaluators(evaluators, embedder, state.params)
        writer.write(done, results)
        grid = evaluate.sample_grid(evaluators, embedder, state.params)
        if grid is not None:
          writer.write_image(done, "samples", grid)
        if process0:
          print(evaluate.format_table(results), flush=True)
        timer = (time.time(), done)
    if pending is not None:
      last, skipped_total, timer = _handle_metrics(*pending, config, writer, progress,
                                                   skipped_total, timer)
  checkpointer.close()
  writer.close()
  return {**last, **results}


def _handle_metrics(step: int, metrics: dict, config: ml_collections.ConfigDict,
                    writer: writers.MetricWriter, progress: writers.Progress,
                    skipped_total: int, timer: tuple[float, int]):
  metrics = jax.device_get(metrics)
  if not metrics["finite"] and config.loss.nonfinite_policy == "stop":
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {step} (config loss.nonfinite_policy='stop'); "
        "the update was not applied and the last checkpoint is intact")
  skipped_total += int(metrics.pop("skipped_records"))
  metrics.pop("finite")
  if not is_due(step, config.log_every_steps, config.total_steps):
    return {}, skipped_total, timer
  start_time, start_step = timer
  now = time.time()
  metrics["examples_per_sec"] = (step - start_step) * config.batch_size / max(now - start_time,
                                                                             1e-9)
  metrics["data/skipped"] = skipped_total
  writer.write(step, metrics)
  if jax.process_index() == 0:
    progress.print(step, metrics)
  return metrics, skipped_total, (now, step)


def initialize_distributed() -> None:
  """Explicit flags for local multi-process runs; auto-detection on TPU pods and SLURM."""
  flags = cli.FLAGS
  if flags.coordinator_address:
    jax.distributed.initialize(coordinator_address=flags.coordinator_address,
                               num_processes=flags.num_processes, process_id=flags.process_id,
                               initialization_timeout=300)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get(
      "TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  del argv
  cli.quiet_libraries()
  initialize_distributed()
  config = cli.validated_config()
  cli.enable_compilation_cache(config)
  train_and_evaluate(config, os.path.expanduser(cli.FLAGS.workdir))


if __name__ == "__main__":
  cli.define_flags(distributed=True)
  app.run(main)
