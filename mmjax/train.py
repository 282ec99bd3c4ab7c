"""Trains a model from a config; rerunning the same command resumes from the last checkpoint.

  python -m mmjax.train --config configs/shapes.py --workdir /tmp/mmjax_shapes \
      [--config.total_steps=1000 ...]

Multi-process: auto-detected on TPU pods and SLURM; on one machine pass
`--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I` (see launch/).

Exit status: 0 done; 42 preempted (SIGTERM or Ctrl-C; the step reached was checkpointed,
rerun to resume); 43 a hang (mmjax.watchdog: no step completed within watchdog.timeout_s;
stacks in WORKDIR/hangs/); 130 a second Ctrl-C (exited at once, nothing uncommitted kept);
2 a usage error (one line on stderr naming the flag, config key, dataset or work
directory and what to do); 1 an expected failure of the run (one line naming the config
key, checkpoint, step or data source); anything else is a bug (traceback).

Fault injection for tests (environment variables, deliberately not config keys: they never
reach a checkpoint's config and cannot be set by accident in a real run):
  MMJAX_DEBUG_SIGTERM_AT_STEP=N  this process sends itself SIGTERM right after dispatching
                                 update N, exercising the real preemption path.
  MMJAX_DEBUG_HANG_AT_STEP=N     update N never completes in this process: it blocks for good
                                 once N is dispatched, as in a collective whose peer is gone
                                 (mmjax.watchdog).
  MMJAX_DEBUG_STORE_FAILURES=RATE:FIRST-LAST
                                 each try of a write retried by mmjax.retry (checkpoint
                                 saves and seals, goodput.json; metrics and events on gs://)
                                 fails with an HTTP 503 at RATE from step FIRST to LAST.
  MMJAX_DEBUG_NAN_AT_STEP=N      the batch of update N gets a token id outside every
                                 vocabulary in this process's slice (`poison_batches`), whose
                                 embedding is NaN: a non-finite loss and gradients that
                                 exercise the real non-finite guard.
"""
import collections
import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmjax import checkpoint, cli, command, compiled, coordination, evaluators, goodput
from mmjax import interrupts, local_checkpoint, locks, objectives, profiling, retry, runtime
from mmjax import summary
from mmjax import topologies, warm_start, watchdog, writers
from mmjax.data import accounting, pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evaluators import grid

PREEMPTED_EXIT_CODE = 42


class NonFiniteLossError(FloatingPointError):
  pass


class Preemption:
  """Set by SIGTERM or SIGINT (single process) or JAX's preemption sync point (several
  processes; SIGINT is forwarded to it: mmjax.interrupts).

  With several processes every one must checkpoint the same step, so the decision comes
  from the coordination service: its preemption notifier catches SIGTERM in any process and
  all processes agree on the first step after the notice (`reached_preemption_sync_point`,
  which must be called at every step). We must not install a Python SIGTERM handler there:
  it would replace the notifier's. If the preemption service is disabled
  (`jax_enable_preemption_service=False`), SIGTERM keeps its default action (the process
  dies) and the job resumes from the last periodic checkpoint.
  """

  def __init__(self, checkpoint_dir: str):
    self._multi = jax.process_count() > 1
    self._service = True
    self.interrupts = interrupts.Interrupts((checkpoint_dir,), multi_process=self._multi)

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self.interrupts.requested
    if not self._service:
      return False
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # preemption service disabled: periodic checkpoints only
      print(f"warning: no preemption checkpoints ({e})", file=sys.stderr, flush=True)
      self._service = False
      return False


def _debug_step(name: str) -> int | None:
  """A test-only fault-injection step from the environment (see the module docstring)."""
  value = os.environ.get(name, "")
  return int(value) if value else None


# A token id no embedding table has: jnp.take (nn.Embed's lookup) fills an out-of-range
# row with NaN, which reaches the loss and the gradients through the text encoders.
POISON_TOKEN_ID = np.iinfo(np.int32).max


def poison_batches(batches: Iterator[dict[str, np.ndarray]], start_step: int,
                   nan_at_step: int | None) -> Iterator[dict[str, np.ndarray]]:
  """Passes batches through; in the one for update `nan_at_step` (1-based) every row's
  first token becomes POISON_TOKEN_ID (uint8 pixels cannot hold a NaN). Every row: a loss
  may read only some rows' texts (FLAVA's MLM: the text-only ones)."""
  for done, batch in enumerate(batches, start=start_step + 1):
    if done == nan_at_step:
      batch = {**batch, "text": batch["text"].copy()}
      batch["text"][:, 0] = POISON_TOKEN_ID
    yield batch


def device_batches(batches: Iterator[dict[str, np.ndarray]], rt: runtime.Runtime,
                   size: int) -> Iterator[dict[str, jax.Array]]:
  """Keeps `size` batches in flight to the devices so the host never stalls the step."""
  queue = collections.deque()
  for local in batches:
    queue.append(rt.global_batch(local))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


START_BARRIER_TIMEOUT_S = 900


def _barrier(name: str, timeout_s: int) -> None:
  """All processes wait here (mmjax.coordination: not a device collective, which on CPUs is
  bound by gloo's 30 s rendezvous, the very limit this barrier avoids)."""
  coordination.barrier(name, timeout_s)


def is_due(step: int, every: int, total: int) -> bool:
  return step == total or (every > 0 and step % every == 0)


def evaluation_interval(entry: ml_collections.ConfigDict,
                        config: ml_collections.ConfigDict) -> int:
  """Steps between two runs of one evaluator (`evals.<key>.every_steps`, configs/schema.py);
  0 = only at the last step."""
  if entry.every_steps == 0:
    return config.eval_every_steps
  return max(entry.every_steps, 0)


def run_tokenizer(config: ml_collections.ConfigDict,
                  checkpointer: checkpoint.Checkpointer) -> tokenizer_lib.Tokenizer:
  """The tokenizer of the checkpoint the run resumes from (the one its model learnt: a work
  directory written by `mmjax.convert` fine-tunes without data.tokenizer.path), else the
  config's (`tokenizer_lib.get_tokenizer`)."""
  latest = checkpointer.latest_step()
  return tokenizer_lib.get_tokenizer(
      config, checkpointer.restore_assets(latest) if latest is not None else None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs training to `config.total_steps`; returns the last logged metrics and eval results.

  Raises SystemExit(PREEMPTED_EXIT_CODE) after checkpointing on preemption,
  NonFiniteLossError (nonfinite_policy='stop'), checkpoint.CheckpointMismatchError,
  accounting.TooManySkippedError (data.max_skip_fraction).
  """
  process0 = jax.process_index() == 0
  # First: a Ctrl-C from here on stops with a checkpoint instead of a traceback.
  preemption = Preemption(os.path.join(workdir, checkpoint.DIRECTORY))
  local = (local_checkpoint.LocalCheckpoints(config.checkpoint.local_dir, workdir)
           if config.checkpoint.local_dir else None)
  # Mesh, model, optimizer, objective: abstract state and shardings (no device memory yet).
  rt = runtime.build(config)
  # Shared: goodput.json counts the retries of every writer (metrics, events, checkpoints).
  storage = retry.Retrier(faults=retry.InjectedFailures.from_environment(
      os.environ, seed=jax.process_index()))
  checkpointer = checkpoint.Checkpointer(workdir, config, set_aside_incomplete=True,
                                         retrier=storage)
  tokenizer = run_tokenizer(config, checkpointer)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise cli.ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but config "
                          f"model.text.vocab_size={config.model.text.vocab_size}")
  # Before any state or compile: a wrong evaluation dataset, split or key fails in seconds.
  evals = evaluators.build_evaluators(config, tokenizer) if config.eval_every_steps else []
  sigterm_at_step = _debug_step("MMJAX_DEBUG_SIGTERM_AT_STEP")
  nan_at_step = _debug_step("MMJAX_DEBUG_NAN_AT_STEP")
  hang_at_step = _debug_step("MMJAX_DEBUG_HANG_AT_STEP")
  writer, train_iterator, profiler = None, None, None
  hang_watch = watchdog.Watchdog(workdir, jax.process_index(), **config.watchdog)
  accounts = goodput.Goodput(workdir, enabled=process0, retrier=storage)

  def phase(name: str) -> contextlib.ExitStack:
    """A long phase for the watchdog, a bucket of wall time for goodput.json."""
    stack = contextlib.ExitStack()
    stack.enter_context(hang_watch.phase(name))
    stack.enter_context(accounts.phase(name))
    return stack

  try:
    with rt.activate():
      # Shard: the state is created or restored directly onto its shardings.
      latest = checkpointer.latest_step()
      start_step = latest or 0
      data_position = None
      local_step = None
      if local is not None:  # the newest whole step of either tier
        with accounts.phase("checkpoint restore"):
          local_step = local.resume_step(local_checkpoint.layout_of(rt.abstract_state), latest)
      if local_step is not None:
        with accounts.phase("checkpoint restore"):
          state, data_position = local.restore(local_step, rt.abstract_state)
        start_step = local_step
        if process0:
          print(f"Resumed from the local tier ({local.local_dir}) at step {start_step}: "
                f"{local.reason}", flush=True)
          writers.truncate_metrics(workdir, start_step)
      elif latest is not None:  # includes step 0, e.g. a converted checkpoint to fine-tune
        with accounts.phase("checkpoint restore"):
          state = checkpointer.restore(start_step, rt.abstract_state)
        data_position = checkpointer.restore_data(start_step)
        # Every process: an Orbax restore ends at a barrier of all processes (from process
        # 0 alone it waited forever for the others, already at the start barrier).
        saved_config = checkpointer.saved_config(start_step)
        if process0:
          print(f"Resumed from {checkpointer.directory} at step {start_step}"
                + (f" (persistent tier; local tier: {local.reason})" if local else ""),
                flush=True)
          changed = checkpoint.config_changes(saved_config, config)
          if changed:
            print(f"Config differs from the checkpoint's at: {', '.join(changed)}", flush=True)
          writers.truncate_metrics(workdir, start_step)
      else:
        if local and process0 and local.reason != local_checkpoint.NOTHING:
          print(f"Starting at step 0 (local tier not restored: {local.reason})", flush=True)
        if process0:  # lines of an attempt that died before its first checkpoint are redone
          writers.truncate_metrics(workdir, 0)
        state = rt.init_state()
        if config.init.checkpoint:
          params, table = warm_start.initial_params(config, state.params)
          ema = jax.tree.map(jnp.copy, params) if config.optimizer.ema_decay else None
          state = state.replace(params=params, ema_params=ema)
          if process0:
            print(table, flush=True)
      writer = writers.MetricWriter(workdir, enabled=process0, retrier=storage,
                                     config=config)
      # Compiled before the loop, from the abstract state and batch exactly as mmjax.aot
      # compiles it for a target: its memory is printed before the first step.
      accounts.resumed(start_step, tier="local" if local_step is not None else "persistent")
      with accounts.phase("compilation"):
        train_step = rt.lower_train_step().compile()
      if process0:
        print(compiled.memory_line(train_step, jax.local_devices()[0]), flush=True)
      embedder = evaluators.Embedder.for_runtime(rt)
      train_iterator = pipeline.make_train_iterator(
          config, tokenizer, start_step=start_step, process_index=jax.process_index(),
          process_count=jax.process_count(),
          unimodal_steps=objectives.unimodal_steps(config))
      batches = device_batches(poison_batches(train_iterator, start_step, nan_at_step), rt,
                               config.data.prefetch_batches)
      if jax.process_count() > 1:
        # Gloo gives peers only 30 s to meet at their first collective, so a process that
        # compiles or starts its input slower (loaded host, cold cache) would fail the job:
        # with the step compiled and the first batch on the devices, all meet at a
        # coordination-service barrier whose timeout is ours.
        first = next(batches)
        _barrier("mmjax_train_start", START_BARRIER_TIMEOUT_S)
        batches = itertools.chain([first], batches)

      # Loop. Metrics are fetched one step late, so the host never waits on the step in
      # flight, except before a checkpoint: the policy 'stop' must fire before a state that
      # contains a non-finite step is saved (the save syncs on the state anyway).
      progress = writers.Progress(config.total_steps, start_step)
      throughput = Throughput.from_config(config)
      skips = accounting.SkipAccount.from_config(config, data_position)
      pending, last, results = None, {}, {}
      timer = (time.time(), start_step)

      def flush(pending, last, timer):
        if pending is None:
          return None, last, timer
        handled = _handle_metrics(*pending, config, writer, progress, throughput, skips, timer)
        hang_watch.beat(pending[0])  # its metrics are on the host: the step completed
        if is_due(pending[0], config.log_every_steps, config.total_steps):
          accounts.write()
        return (None, *handled)

      profiler = profiling.StepProfiler(config, workdir)
      hang_watch.start()
      accounts.start_steps()
      for step in range(start_step, config.total_steps):
        with accounts.phase("data wait"):
          batch = next(batches)
        state, metrics = profiler.run(step, train_step, state, batch)
        done = step + 1
        if done == sigterm_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        pending, last, timer = flush(pending, last, timer)
        if done == hang_at_step:
          threading.Event().wait()
        pending = (done, metrics)
        storage.at_step(done)
        accounts.step_done(done)
        checkpointer.seal_committed()
        preempted = preemption.reached(done)
        if preempted or is_due(done, config.checkpoint_every_steps, config.total_steps):
          pending, last, timer = flush(pending, last, timer)
          with phase("checkpoint save"):
            checkpointer.save(done, state, config, data=skips.state(),
                              assets=tokenizer_lib.checkpoint_assets(tokenizer))
        elif local and is_due(done, config.checkpoint.local_every_steps, 0):
          pending, last, timer = flush(pending, last, timer)  # 'stop' fires before a save
          with phase("checkpoint save"):
            local.save(done, state, data=skips.state())
        if preempted:
          with phase("checkpoint save"):
            checkpointer.wait()
          if process0:
            print(f"Preempted: saved step {done} to {checkpointer.directory}; rerun the same "
                  "command to resume", flush=True)
          raise SystemExit(PREEMPTED_EXIT_CODE)
        due = [e for e in evals if is_due(done, evaluation_interval(e.entry, config),
                                          config.total_steps)]
        if due:
          # Log this step before evaluating, so evaluation time is not counted as training.
          pending, last, timer = flush(pending, last, timer)
          params = state.ema_params if config.eval_use_ema else state.params
          with phase("evaluation"):  # the sample grid's PNG included
            results = grid.evaluate_and_record(due, evals, embedder, params, writer,
                                               workdir, done)
          writer.write(done, results)
          if process0:
            print(evaluators.format_results(results), flush=True)
          timer = (time.time(), done)
      pending, last, timer = flush(pending, last, timer)
  finally:
    # Also on errors: commit the saves in flight, so the last good checkpoint survives.
    if profiler is not None:
      profiler.stop()
    if train_iterator is not None:
      train_iterator.close()
    with phase("checkpoint save"):
      checkpointer.close()
      if local is not None:
        local.close()
    hang_watch.stop()
    accounts.write()
    if writer is not None:
      writer.close()
  return {**last, **results}


class Throughput:
  """Model FLOP/s per device and MFU from examples/s (`mmjax.summary`'s FLOPs formula)."""

  def __init__(self, flops_per_example: int | None, peak_flops: float | None, devices: int):
    self.flops_per_example, self.peak_flops, self.devices = flops_per_example, peak_flops, devices

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Throughput":
    return cls(summary.model_flops_per_example(config),
               topologies.peak_flops_per_device(jax.devices()[0].device_kind,
                                             config.peak_tflops_per_device),
               jax.device_count())

  def metrics(self, examples_per_sec: float) -> dict[str, float]:
    """`tflops_per_sec_per_device` when the model has a FLOPs formula; `mfu` also needs the
    device's peak."""
    if self.flops_per_example is None:
      return {}
    flops = examples_per_sec * self.flops_per_example / self.devices
    out = {"tflops_per_sec_per_device": flops / 1e12}
    if self.peak_flops:
      out["mfu"] = flops / self.peak_flops
    return out


def _handle_metrics(step: int, metrics: dict, config: ml_collections.ConfigDict,
                    writer: writers.MetricWriter, progress: writers.Progress,
                    throughput: Throughput, skips: accounting.SkipAccount,
                    timer: tuple[float, int]):
  metrics = jax.device_get(metrics)
  if not metrics["finite"] and config.nonfinite_policy == "stop":
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {step} (config nonfinite_policy='stop'); "
        "the update was not applied and no checkpoint containing it was written")
  skips.add(metrics.pop("data_counts"))  # raises past data.max_skip_fraction
  metrics.pop("finite")
  if not is_due(step, config.log_every_steps, config.total_steps):
    return {}, timer
  start_time, start_step = timer
  now = time.time()
  metrics["examples_per_sec"] = (step - start_step) * config.batch_size / max(now - start_time,
                                                                             1e-9)
  metrics.update(throughput.metrics(metrics["examples_per_sec"]))
  metrics.update(skips.metrics())
  writer.write(step, metrics)
  if jax.process_index() == 0:
    progress.print(step, metrics)
  return metrics, (now, step)


def initialize_distributed() -> None:
  """Explicit flags for local multi-process runs; auto-detection on TPU pods and SLURM.

  A process that dies stops sending heartbeats; after `--heartbeat_timeout_seconds` the
  coordination service reports it and every other process terminates, so a job never hangs
  in a collective waiting for a dead peer.
  """
  flags = cli.FLAGS
  timeouts = dict(initialization_timeout=flags.initialization_timeout_seconds,
                  heartbeat_timeout_seconds=flags.heartbeat_timeout_seconds,
                  shutdown_timeout_seconds=flags.shutdown_timeout_seconds)
  if flags.coordinator_address:
    if flags.num_processes is None or flags.process_id is None:
      raise cli.ConfigError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=flags.coordinator_address,
                               num_processes=flags.num_processes, process_id=flags.process_id,
                               **timeouts)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get(
      "TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize(**timeouts)


def main(argv: list[str]) -> None:
  del argv
  initialize_distributed()
  config = cli.validated_config()
  cli.enable_compilation_cache(config)
  workdir = os.path.expanduser(cli.FLAGS.workdir)
  # One job per work directory: a second one is refused here, before any work.
  with locks.hold_workdir(workdir, jax.process_index(), jax.process_count()):
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
  cli.define_flags(distributed=True)
  # One line on stderr, no traceback: exit 2 for a usage error (errors.UsageError), 1 for
  # these expected failures.
  command.run(main, "mmjax.train", failures=(checkpoint.CheckpointMismatchError,
                                             NonFiniteLossError,
                                             accounting.TooManySkippedError))
