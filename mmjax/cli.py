"""Command-line flags shared by every mmjax command, and config validation.

Every command takes `--config FILE[:ARG]` with `--config.KEY=VALUE` overrides (ml_collections
config_flags: unknown keys fail with a "did you mean" suggestion, values are type-checked).
`validate` then checks what config_flags cannot, before any device memory is allocated.
"""
import importlib.util
import math
import os
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from mmjax import sharding
from mmjax.models import layers

FLAGS = flags.FLAGS


def define_flags(*, step: bool = False, distributed: bool = False) -> None:
  config_flags.DEFINE_config_file("config", None, "Config file[:arg], e.g. configs/shapes.py",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, eval).")
  flags.mark_flags_as_required(["config", "workdir"])
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
                         "Multi-process: how long an exiting process waits for the others (generous: "
                         "processes finish local work, e.g. checkpoint commits, at "
                         "different speeds on a loaded host).")


def quiet_libraries() -> None:
  """TFDS progress bars and Orbax/absl INFO lines drown the progress line; --verbosity wins."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`FILE[:ARG]` -> FILE's `get_config(ARG)`, for scripts without absl flags (benchmarks)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist")
  return load_config_module(path).get_config(arg or None)


def load_config_module(path: str) -> Any:
  """A config file as a module (configs/ is not a package), e.g. for its helper functions."""
  module_spec = importlib.util.spec_from_file_location("_mmjax_loaded_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """XLA compiles are slow on CPU; a persistent cache makes restarts and reruns start fast."""
  if config.get("compilation_cache_dir"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(config.compilation_cache_dir))


def validated_config() -> ml_collections.ConfigDict:
  validate(FLAGS.config)
  return FLAGS.config


class ConfigError(ValueError):
  pass


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the offending key. Touches no device memory."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  try:
    shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  batch_parallel = shape[0] * shape[1]
  _require(config.batch_size > 0, f"config batch_size={config.batch_size} must be positive")
  _require(config.batch_size % batch_parallel == 0,
           f"config batch_size={config.batch_size} is not divisible by the data-parallel size "
           f"{batch_parallel} (mesh.shape data x fsdp = {shape[0]} x {shape[1]})")
  _require(config.batch_size % jax.process_count() == 0,
           f"config batch_size={config.batch_size} is not divisible by the "
           f"{jax.process_count()} processes")
  accum = config.grad_accum_steps
  _require(accum >= 1 and config.batch_size % (accum * batch_parallel) == 0,
           f"config grad_accum_steps={accum}: batch_size={config.batch_size} must split into "
           f"{accum} micro-batches divisible by the data-parallel size {batch_parallel}")
  _require(config.total_steps > 0, f"config total_steps={config.total_steps} must be positive")
  for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
    _require(config[key] >= 0, f"config {key}={config[key]} must be >= 0 (0 = off)")
  _require(config.peak_tflops_per_device >= 0,
           f"config peak_tflops_per_device={config.peak_tflops_per_device} must be >= 0 "
           "(0 = look up the device kind)")
  weights = {name: s.weight for name, s in config.data.sources.items()}
  _require(all(w >= 0 for w in weights.values()) and math.fsum(weights.values()) > 0,
           f"config data.sources.*.weight={weights} must be >= 0 and sum to a positive number")
  for name, source in config.data.sources.items():
    _require(source.kind in ("label", "caption"),
             f"config data.sources.{name}.kind={source.kind!r}: choose 'label' or 'caption'")
    key = "label_key" if source.kind == "label" else "text_key"
    _require(bool(source[key]), f"config data.sources.{name}.{key} must be set for "
                                f"kind={source.kind!r}")
  _require(config.data.max_text_len >= 3,
           f"config data.max_text_len={config.data.max_text_len} must hold BOS, a token, EOS")
  _require(config.model.image_size % config.model.patch_size == 0,
           f"config model.image_size={config.model.image_size} is not divisible by "
           f"model.patch_size={config.model.patch_size}")
  _require(config.checkpoint.max_to_keep >= 1,
           f"config checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be >= 1")
  _require(config.checkpoint.keep_period >= 0,
           f"config checkpoint.keep_period={config.checkpoint.keep_period} must be >= 0 "
           "(0 = off)")
  _require(config.loss.nonfinite_policy in ("skip", "stop"),
           f"config loss.nonfinite_policy={config.loss.nonfinite_policy!r}: "
           "choose 'skip' or 'stop'")
  _require(config.loss.caption_chunk_size >= 0,
           f"config loss.caption_chunk_size={config.loss.caption_chunk_size} must be >= 0 "
           "(0 = plain logits)")
  policies = ("none", *layers.REMAT_POLICIES)
  _require(config.model.remat_policy in policies,
           f"config model.remat_policy={config.model.remat_policy!r}: choose one of "
           f"{', '.join(policies)}")
  for key in ("start_step", "num_steps"):
    _require(config.profile[key] >= 0,
             f"config profile.{key}={config.profile[key]} must be >= 0")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)
