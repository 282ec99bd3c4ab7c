"""The flags of the commands that run a model in a work directory (train, evaluate), and
config validation.

Every command takes `--config FILE[:ARG]` with `--config.KEY=VALUE` overrides, defined once
by the command skeleton (`mmjax.command`: ml_collections config_flags, so unknown keys fail
with a "did you mean" suggestion and values are type-checked). `validate` then checks what
config_flags cannot, before any device memory is allocated.
"""
import importlib
import math
import os

import jax
import ml_collections
from absl import flags

from mmjax import evaluators, models, objectives, optimizer, sharding, state
from mmjax.data import transforms
from mmjax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags(*, step: bool = False, distributed: bool = False,
                 workdir_required: bool = True) -> None:
  """--workdir (required unless the command checks it itself), and --step or the
  multi-process flags; --config comes with the command skeleton (mmjax.command.run)."""
  flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, eval).")
  if workdir_required:
    flags.mark_flags_as_required(["workdir"])
  if step:
    flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  if distributed:
    flags.DEFINE_string("coordinator_address", None,
                        "HOST:PORT of process 0 for multi-process runs without auto-detection.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with coordinator_address).")
    flags.DEFINE_integer("initialization_timeout_seconds", 300,
                         "Multi-process: how long to wait for all processes to connect.")
    flags.DEFINE_integer("heartbeat_timeout_seconds", 60,
                         "Multi-process: a process silent this long is declared dead and the "
                         "whole job fails (bounds the time a dead peer can hang the others).")
    flags.DEFINE_integer("shutdown_timeout_seconds", 300,
                         "Multi-process: how long an exiting process waits for the "
                         "others (generous: processes finish local work, e.g. "
                         "checkpoint commits, at different speeds on a loaded host).")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`configs/NAME.py[:ARG]` (the `--config` format) -> `configs.NAME.get_config(ARG)`, for
  scripts that take a config without absl flags (benchmarks). Files outside the `configs`
  package: use a command's `--config`, which loads any file."""
  path, _, arg = spec.partition(":")
  folder, name = os.path.split(os.path.normpath(path))
  if os.path.basename(folder) != "configs" or not name.endswith(".py"):
    raise ConfigError(f"config {spec!r}: expected configs/NAME.py[:ARG]")
  try:
    module = importlib.import_module(f"configs.{name[:-3]}")
  except ModuleNotFoundError as e:
    raise ConfigError(f"config {spec!r}: no such config module ({e})") from None
  return module.get_config(arg or None)


def enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """XLA compiles are slow on CPU; a persistent cache makes restarts and reruns start fast."""
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(config.compilation_cache_dir))


def validated_config() -> ml_collections.ConfigDict:
  validate(FLAGS.config)
  return FLAGS.config


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises one ConfigError listing every `problems` line, if there are any."""
  found = problems(config, num_devices)
  if found:
    raise ConfigError(*dict.fromkeys(found))  # once each


def problems(config: ml_collections.ConfigDict, num_devices: int | None = None) -> list[str]:
  """Everything knowable from the config alone, before any tokenizer, data or device work,
  one line each naming the key: run length and cadence, mesh and batch split, the data
  mixture, the optimizer, and each registry's entries (the model, the objective, every
  evaluator entry: `check` of mmjax.models, .objectives, .evaluators, which run each
  entry's own)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  found = _check_run(config, num_devices) + _check_data(config)
  try:
    optimizer.make_optimizer(config)
  except ValueError as e:  # it names the key
    found.append(str(e))
  parts = [line for registry in (models, objectives, evaluators)
           for line in registry.check(config)]
  if not parts:  # the model can be built: its tree is what optimizer.frozen patterns match
    parts = optimizer.check(config, _abstract_params(config) if config.optimizer.frozen
                            else {})
  return found + parts


def _check_run(config: ml_collections.ConfigDict, num_devices: int) -> list[str]:
  try:
    shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    return [str(e)]
  axes = sharding.batch_axes(config.mesh.rules)
  batch_parallel = math.prod(size for axis, size in zip(sharding.MESH_AXES, shape)
                             if axis in axes)
  accum = config.grad_accum_steps
  checks = [
      (config.batch_size > 0, f"config batch_size={config.batch_size} must be positive"),
      (config.batch_size % batch_parallel == 0,
       f"config batch_size={config.batch_size} is not divisible by the data-parallel size "
       f"{batch_parallel} (mesh.shape {shape} over the batch axes {axes})"),
      (config.batch_size % jax.process_count() == 0,
       f"config batch_size={config.batch_size} is not divisible by the "
       f"{jax.process_count()} processes"),
      (accum >= 1 and (config.batch_size % (accum * batch_parallel) == 0
                       or config.batch_size % batch_parallel != 0),  # said once, above
       f"config grad_accum_steps={accum}: batch_size={config.batch_size} must split into "
       f"{accum} micro-batches divisible by the data-parallel size {batch_parallel}"),
      (config.total_steps > 0, f"config total_steps={config.total_steps} must be positive"),
      (config.peak_tflops_per_device >= 0,
       f"config peak_tflops_per_device={config.peak_tflops_per_device} must be >= 0 "
       "(0 = look up the device kind)"),
      (config.checkpoint.max_to_keep >= 1,
       f"config checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be >= 1"),
      (config.checkpoint.keep_period >= 0,
       f"config checkpoint.keep_period={config.checkpoint.keep_period} must be >= 0 (0 = off)"),
      (config.checkpoint.local_every_steps >= 0,
       f"config checkpoint.local_every_steps={config.checkpoint.local_every_steps} must be "
       ">= 0 (0 = off)"),
      (config.checkpoint.local_every_steps <= 0 or config.checkpoint.local_dir,
       f"config checkpoint.local_every_steps={config.checkpoint.local_every_steps} needs "
       "checkpoint.local_dir (each host's fast local folder, e.g. /dev/shm/mmjax)"),
      (not config.checkpoint.local_dir or config.checkpoint.local_every_steps != 0,
       f"config checkpoint.local_dir={config.checkpoint.local_dir!r} needs "
       "checkpoint.local_every_steps > 0 (how often to save there), or set it to '' (off)"),
      (config.nonfinite_policy in ("skip", "stop"),
       f"config nonfinite_policy={config.nonfinite_policy!r}: choose 'skip' or 'stop'"),
      (config.eval_batch_size > 0,
       f"config eval_batch_size={config.eval_batch_size} must be positive"),
  ]
  checks += [(config[key] >= 0, f"config {key}={config[key]} must be >= 0 (0 = off)")
             for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps")]
  checks += [(config.watchdog[key] >= 0,
              f"config watchdog.{key}={config.watchdog[key]} must be >= 0 (0 = off)")
             for key in ("timeout_s", "long_timeout_s")]
  checks.append((config.watchdog.straggler_factor > 1,
                 f"config watchdog.straggler_factor={config.watchdog.straggler_factor} must "
                 "be > 1"))
  checks += [(config.profile[key] >= 0,
              f"config profile.{key}={config.profile[key]} must be >= 0")
             for key in ("start_step", "num_steps")]
  return [message for ok, message in checks if not ok]


def _check_data(config: ml_collections.ConfigDict) -> list[str]:
  d = config.data
  problems = []
  weights = {name: s.weight for name, s in d.sources.items()}
  if not (all(w >= 0 for w in weights.values()) and math.fsum(weights.values()) > 0):
    problems.append(f"config data.sources.*.weight={weights} must be >= 0 (0 = off) and "
                    "sum to a positive number")
  for name, source in d.sources.items():
    if source.kind not in ("label", "caption"):
      problems.append(f"config data.sources.{name}.kind={source.kind!r}: choose 'label' or "
                      "'caption'")
      continue
    key = "label_key" if source.kind == "label" else "text_key"
    if not source[key]:
      problems.append(f"config data.sources.{name}.{key} must be set for "
                      f"kind={source.kind!r}")
    if source.modality not in transforms.MODALITIES:  # the objective checks which it uses
      problems.append(f"config data.sources.{name}.modality={source.modality!r}: choose one "
                      f"of {transforms.MODALITIES}")
  if d.max_text_len < 3:
    problems.append(f"config data.max_text_len={d.max_text_len} must hold BOS, a token, EOS")
  if d.tokenizer.kind not in ("sentencepiece", "openclip", "siglip"):
    problems.append(f"config data.tokenizer.kind={d.tokenizer.kind!r}: choose "
                    "'sentencepiece', 'openclip' or 'siglip'")
  return problems


def _abstract_params(config: ml_collections.ConfigDict) -> dict:
  """The model's parameter tree as shapes only (nothing is allocated)."""
  model = models.build_model(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *state.dummy_inputs(config)))
  return jax.tree.map(lambda x: getattr(x, "value", x), boxed["params"],
                      is_leaf=lambda x: hasattr(x, "value"))
  return problems
