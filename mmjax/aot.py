"""Ahead-of-time compile report: does a config fit a TPU slice or GPU node, and what does its
step cost there? Runs on any machine (a laptop), without the hardware.

  python -m mmjax.aot --config configs/coca.py:base,v4_32 --topology v4-32
  python -m mmjax.aot --config configs/coca.py:base,h100x8 --topology h100x8 \
      --what train,eval,decode
  python -m mmjax.aot --config configs/coca.py:giant,v5p_128 --topology v5p-128 --num_slices 2
  python -m mmjax.aot ... --suggest   # over budget or < 10% headroom: search a value that fits
  python -m mmjax.aot ... --json      # only the JSON object

Install the compilers once: `pip install -e '.[tpu-aot]'` (libtpu) and/or `'.[gpu-aot]'`
(the CUDA plugin); both live in one environment. The host backend is forced to the CPU.
Topology names: see `mmjax.topologies` (v4-32, v5e-16, v5p-128, v6e-8, h100x8, h100x8x4...).

What is compiled is the real thing: the train step `mmjax.train` runs, set up by the same
`runtime.build(config, devices)` over the target's abstract devices and lowered by the same
`Runtime.lower_train_step` (same function, shardings, donation, micro-batching by
grad_accum_steps, mesh incl. the DCN axis of multislice), from abstract state only
(`jax.eval_shape`; no array is ever created), by the target's own compiler (libtpu /
XLA:GPU). `--what eval` adds the evaluators' embedding programs (`evaluators.Embedder`, at
eval_batch_size), `--what decode` the K/V-cached captioning decoder
(`decode.make_captioner`).

Per device, the report gives:
  memory   arguments split into parameters, optimizer state, other state and the batch
           (shard sizes from the abstract shapes and shardings; `argument_adjustment` is
           the compiler's argument bytes minus that sum: layout tiling, or inputs a program
           does not read and XLA drops), temporaries, outputs not aliased to a donated
           input; total = their sum = argument + output - alias + temp of
           `compiled.memory_analysis()`. On TPU this total is the figure the
           compiler checks against its available HBM (an over-budget program fails to
           compile with RESOURCE_EXHAUSTED; the report then quotes the compiler's figures).
  fits     total <= device memory, and the headroom (capacity - total) / capacity.
  FLOPs    compiled matmul FLOPs (`mmjax.hlo` over the compiled HLO; XLA's cost_analysis
           counts a while loop's body once and gives nothing for GPUs ahead of time)
           against the model FLOPs of `mmjax.summary` (training, matmuls only) per device:
           the ratio is the recompute overhead (remat, the extra embedding pass of gradient
           caching, the contrastive loss's recomputed logits) plus non-matmul work.
  estimate TPU only: the compiler's cost-model step time (`optimal_seconds`) and the MFU it
           implies, shown only when plausible (positive and not faster than the compiled
           FLOPs at the chip's peak); it is a compiler estimate, not a measurement.
  collectives  per kind in the compiled HLO: count and result bytes per step; ops inside
           while loops (scanned layers, micro-batches) are multiplied by the loop's known
           trip count, and reported per iteration (flagged) when the count is unknown.
The last stdout line is one JSON object (fits, memory_per_device_bytes, device_memory_bytes,
topology, num_devices, compile_s, compiled_flops_per_device, model_flops_per_device, ...).
Exit status: 0 it fits (all programs), 1 it does not, 2 a usage or config error.
"""
import json
import math
import re
import sys
import time
from importlib import metadata
from typing import Any, Callable

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from mmjax import cli, command, compiled, decode, errors, evaluators, models, runtime, sharding
from mmjax import summary, topologies

GiB = 2**30
# Without a GPU to autotune on, XLA:GPU can fail to tile a Triton GEMM fusion ("Couldn't
# find output tile sizes", CoCa-Base micro-batch 256 on h100x8); cuBLAS GEMMs need no tiling.
HEADROOM_TARGET = 0.10  # presets must keep 10% of device memory free
PROGRAMS = ("train", "eval", "decode")


# --- the programs ---------------------------------------------------------------------------
def _eval_programs(rt: runtime.Runtime) -> dict[str, tuple]:
  """The evaluators' image and text embedding programs (`evaluators.Embedder`) at
  eval_batch_size: name -> (lowered, abstract inputs besides the parameters)."""
  embedder = evaluators.Embedder.for_runtime(rt)
  spec = {k: v for k, v in rt.abstract_batch(embedder.batch_size).items()
          if k in ("image", "text", "text_type")}
  params = rt.abstract_state.params
  with rt.activate():
    return {"eval_image": (embedder.lower_images(params, spec["image"]), spec["image"]),
            "eval_text": (embedder.lower_texts(params, spec["text"], spec["text_type"]),
                          (spec["text"], spec["text_type"]))}


def _decode_programs(rt: runtime.Runtime, entry: ml_collections.ConfigDict) -> dict[str, tuple]:
  """The K/V-cached captioning decoder of the captioning evaluator `entry`, at
  eval_batch_size: name -> (lowered, abstract images)."""
  captioner = decode.make_captioner(rt.model, decode.DecodeConfig(
      strategy=entry.strategy, max_new_tokens=entry.max_new_tokens,
      beam_size=entry.beam_size, length_penalty=entry.length_penalty))
  batch_size = evaluators.Embedder.for_runtime(rt).batch_size
  images = rt.abstract_batch(batch_size)["image"]
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(rt.mesh))
  with rt.activate():
    return {"decode": (captioner.lower(rt.abstract_state.params, images, rng), images)}


# --- one target, one config -----------------------------------------------------------------
def check(config: ml_collections.ConfigDict, target: topologies.Target,
          what: tuple[str, ...] = ("train",), devices: list[Any] | None = None,
          capacity: tuple[int, str] | None = None) -> dict[str, Any]:
  """Compiles `what` of `config` for `target`; the full report (JSON-ready).

  Everything is set up by `runtime.build` over the target's abstract devices, the same
  call `mmjax.train` makes over its real ones. Top-level figures are the first program's
  (the train step by default); `fits` holds only if every program fits. Raises
  errors.ConfigError for a config that cannot run on the target.
  """
  devices = target.devices() if devices is None else devices
  cli.validate(config, num_devices=len(devices))
  capacity_bytes, capacity_source = capacity or target.device_memory_bytes()
  device_kind = devices[0].device_kind
  start = time.perf_counter()
  rt = runtime.build(config, devices)
  lowered = rt.lower_train_step() if "train" in what else None
  lower_s = time.perf_counter() - start
  programs = {}
  if lowered is not None:
    result = compiled.compile_lowered("train", lowered, lower_s, target.platform)
    model_flops = summary.model_flops_per_example(config) * config.batch_size / len(devices)
    state = rt.abstract_state
    programs["train"] = compiled.program_report(
        result, dict(params=state.params, optimizer_state=state.opt_state,
                     other_state=(state.step, state.nonfinite_steps),
                     batch=rt.abstract_batch()),
        capacity_bytes, device_kind, model_flops)
  extra, skipped = {}, {}
  if "eval" in what:
    extra.update(_timed(_eval_programs, rt))
  if "decode" in what:
    entry = _captioning_entry(config)
    if entry is not None:
      extra.update(_timed(lambda rt: _decode_programs(rt, entry), rt))
    else:
      skipped["decode"] = (f"model {config.model.name!r} has no captioning decoder or the "
                           "config no captioning evaluator")
  for name, (lowered_program, seconds, inputs) in extra.items():
    result = compiled.compile_lowered(name, lowered_program, seconds, target.platform)
    programs[name] = compiled.program_report(result, inputs, capacity_bytes, device_kind, None)
  if not programs:
    raise errors.ConfigError("nothing to compile: " + "; ".join(
        f"--what={k}: {v}" for k, v in skipped.items()))
  first = next(iter(programs.values()))
  return dict(
      {k: first[k] for k in SUMMARY_KEYS}, fits=all(p["fits"] for p in programs.values()),
      program=first["program"], topology=target.name,
      platform=target.platform, num_devices=len(devices), num_slices=target.num_slices,
      device_kind=device_kind, device_memory_source=capacity_source,
      mesh=dict(rt.mesh.shape), batch_size=config.batch_size,
      grad_accum_steps=config.grad_accum_steps,
      micro_batch_per_device=_micro_batch_per_device(config, rt.mesh),
      remat_policy=config.model.remat_policy, programs=programs, skipped=skipped,
      versions=versions())


def _captioning_entry(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The first captioning evaluator of the config, if its model decodes captions."""
  if not models.MODELS[config.model.name].captions:
    return None
  return next((e for e in config.evals.values() if e.type == "captioning"), None)


SUMMARY_KEYS = ("memory_per_device_bytes", "device_memory_bytes", "headroom_fraction",
                "lower_s", "compile_s", "compiled_flops_per_device", "model_flops_per_device",
                "flops_ratio", "estimated_step_s", "estimated_mfu")


def _micro_batch_per_device(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> float:
  """Examples per device in one micro-batch (over the mesh axes of the `batch` rule)."""
  return config.batch_size / (config.grad_accum_steps
                              * sharding.batch_parallel_size(mesh, config.mesh.rules))


def _timed(lower_fn: Callable[[runtime.Runtime], dict[str, tuple]],
           rt: runtime.Runtime) -> dict[str, tuple]:
  """name -> (lowered, lowering seconds, argument groups for the memory split)."""
  start = time.perf_counter()
  lowered = lower_fn(rt)
  seconds = (time.perf_counter() - start) / len(lowered)
  return {name: (program, seconds, dict(params=rt.abstract_state.params, batch=inputs))
          for name, (program, inputs) in lowered.items()}


def versions() -> dict[str, str]:
  out = {"jax": jax.__version__}
  for package in ("jaxlib", "libtpu", "jax-cuda12-plugin", "flax"):
    try:
      out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return out


# --- what to turn when it does not fit ------------------------------------------------------
def knob_advice(report: dict[str, Any]) -> list[str]:
  """Config keys that lower the train step's memory, most effective first."""
  advice = []
  micro = report["micro_batch_per_device"]
  if micro > 1:
    advice.append(f"--config.grad_accum_steps={2 * report['grad_accum_steps']} (micro-batch "
                  f"{micro:g} -> {micro / 2:g} examples per device; the contrastive loss still "
                  "sees the whole batch)")
  if report["remat_policy"] not in ("full", "nothing_saveable"):
    advice.append(f"--config.model.remat_policy=full (now {report['remat_policy']!r}: "
                  "recompute each layer in the backward pass)")
  mesh = report["mesh"]
  if mesh["data"] > 1:
    advice.append(f"--config.mesh.shape='(1,{mesh['data'] * mesh['fsdp']},{mesh['tensor']})' "
                  f"(now data {mesh['data']} x fsdp {mesh['fsdp']}: shard parameters and "
                  "optimizer state over all batch devices)")
  return advice


def suggestion_candidates(config: ml_collections.ConfigDict, report: dict[str, Any],
                          num_devices: int) -> list[dict[str, Any]]:
  """Overrides to try in order: the micro-batch that the memory split predicts would leave
  10% headroom (temporaries ~ proportional to the micro-batch), then that halved again,
  then full rematerialisation, then all batch devices in fsdp."""
  candidates = []
  memory, capacity = report["memory"], report["device_memory_bytes"]
  total, temps = report["memory_per_device_bytes"], memory.get("temporaries")
  batch_parallel = report["mesh"]["data"] * report["mesh"]["fsdp"]
  accum = config.grad_accum_steps
  if temps and total:
    budget = (1 - HEADROOM_TARGET) * capacity - (total - temps)
    if budget > 0:
      factor = 2 ** max(1, math.ceil(math.log2(temps / budget)))
      for k in (accum * factor, accum * factor * 2):
        if config.batch_size % (k * batch_parallel) == 0:
          candidates.append({"grad_accum_steps": k})
  if config.model.remat_policy not in ("full", "nothing_saveable"):
    candidates.append({"model.remat_policy": "full"})
  mesh = report["mesh"]
  if mesh["data"] > 1:
    candidates.append({"mesh.shape": (1, -1, mesh["tensor"])})
  del num_devices
  return candidates


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A locked copy of `config` with dotted-key overrides."""
  new = ml_collections.ConfigDict(config.to_dict())
  new.update_from_flattened_dict(overrides)
  new.lock()
  return new


def suggest(config: ml_collections.ConfigDict, target: topologies.Target,
            report: dict[str, Any], devices: list[Any], max_trials: int,
            log: Callable[[str], None]) -> dict[str, Any] | None:
  """Compiles the candidates in turn; the first that fits with >= 10% headroom, as
  {"overrides", "memory_per_device_bytes", "headroom_fraction"}, or None."""
  capacity = (report["device_memory_bytes"], report["device_memory_source"])
  for overrides in suggestion_candidates(config, report, len(devices))[:max_trials]:
    flags = " ".join(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items())
    log(f"suggest: compiling with {flags} ...")
    try:
      trial = check(with_overrides(config, overrides), target, ("train",), devices, capacity)
    except errors.ConfigError as e:
      log(f"suggest: {flags}: {e}")
      continue
    log(f"suggest: {flags}: {_memory_summary(trial)}")
    if trial["fits"] and trial["headroom_fraction"] >= HEADROOM_TARGET:
      return dict(overrides=overrides, flags=flags,
                  memory_per_device_bytes=trial["memory_per_device_bytes"],
                  headroom_fraction=trial["headroom_fraction"])
  return None


def _flag_value(value: Any) -> str:
  return f"'{tuple(value)}'".replace(" ", "") if isinstance(value, (tuple, list)) else str(value)


# --- text output ----------------------------------------------------------------------------
def _gib(n: float | None) -> str:
  return "?" if n is None else f"{n / GiB:.2f}"


def _memory_summary(report: dict[str, Any]) -> str:
  total, capacity = report["memory_per_device_bytes"], report["device_memory_bytes"]
  if total is None:
    return "memory unknown"
  verdict = "fits" if report["fits"] else "does NOT fit"
  return (f"{verdict}: {_gib(total)} of {_gib(capacity)} GiB per device, headroom "
          f"{100 * report['headroom_fraction']:.1f}%")


MEMORY_ROWS = (("params", "parameters"), ("optimizer_state", "optimizer state"),
               ("other_state", "other state (step counters)"), ("batch", "batch / inputs"),
               ("argument_adjustment", "arguments: compiler - shapes"),
               ("temporaries", "temporaries"), ("outputs_not_aliased", "outputs (not aliased)"),
               ("total", "total"))


def format_report(report: dict[str, Any], spec: str) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
  lines = [f"mmjax.aot: {spec} on {report['topology']}: {report['num_devices']} x "
           f"{report['device_kind']}, mesh {mesh}",
           f"batch {report['batch_size']}, grad_accum_steps {report['grad_accum_steps']} -> "
           f"micro-batch {report['micro_batch_per_device']:g} per device, remat "
           f"{report['remat_policy']!r}"]
  for name, p in report["programs"].items():
    lines += ["", f"[{name}]"] + _program_lines(p, report)
  for name, reason in report["skipped"].items():
    lines += ["", f"[{name}] skipped: {reason}"]
  return "\n".join(lines)


def _program_lines(p: dict[str, Any], report: dict[str, Any]) -> list[str]:
  lines = ["  memory per device"]
  for key, label in MEMORY_ROWS:
    if key in p["memory"]:
      lines.append(f"    {label:30s} {compiled.format_size(p['memory'][key]):>12s}")
  if p["compiler_error"]:
    lines.append(f"  compiler: {p['compiler_error']}")
  lines.append(f"  device memory {compiled.format_size(p['device_memory_bytes'])} "
               f"({report['device_memory_source']})")
  if p["memory_per_device_bytes"] is not None:
    need, have = p["memory_per_device_bytes"], p["device_memory_bytes"]
    if p["fits"]:
      flag = "" if p["headroom_fraction"] >= HEADROOM_TARGET else " (below the 10% target)"
      lines.append(f"  fits: yes, headroom {compiled.format_size(have - need)} = "
                   f"{100 * p['headroom_fraction']:.1f}%{flag}")
    else:
      lines.append(f"  fits: NO, short by {compiled.format_size(need - have)} "
                   f"({100 * (need - have) / have:.1f}% over)")
  if p["peak_buffers"]:
    lines.append("  largest buffers live at the memory peak:")
    for b in p["peak_buffers"][:6]:
      lines.append(f"    {compiled.format_size(b['bytes']):>12s}  {b.get('shape', '')[:36]:36s} "
                   f"{_short_op(b.get('op') or b['value'])}")
  lines += _flops_lines(p)
  if p["collectives"]:
    unknown = p["while_loops_of_unknown_trip_count"]
    scope = ("per step" if not unknown else
             f"per step, ops in {unknown} loop(s) of unknown trip count counted once")
    lines.append(f"  collectives ({scope}): " + ", ".join(
        f"{k} {v['count']}x {compiled.format_size(v['bytes'])}"
        for k, v in p["collectives"].items()))
  lines.append(f"  lower {p['lower_s']:.1f} s, compile {p['compile_s']:.1f} s")
  return lines


def _flops_lines(p: dict[str, Any]) -> list[str]:
  compiled_flops, model = p["compiled_flops_per_device"], p["model_flops_per_device"]
  if compiled_flops is None:
    return []
  line = f"  matmul FLOPs per device: compiled {compiled_flops:.4g}"
  if model:
    line += f", model {model:.4g} -> compiled/model {p['flops_ratio']:.2f}x"
  lines = [line]
  if p["estimated_step_s"] is not None:
    mfu = (f", implied MFU {100 * p['estimated_mfu']:.0f}%" if p["estimated_mfu"] else "")
    lines.append(f"  step time {p['estimated_step_s']:.4g} s{mfu} ({p['estimate_note']})")
  elif p["estimate_note"]:
    lines.append(f"  step time: no estimate ({p['estimate_note']})")
  return lines


def _short_op(op: str) -> str:
  """Drop jit(...)/ and transformation wrappers from an op_name for a one-line listing."""
  op = re.sub(r"^jit\([^)]*\)/", "", op)
  return op[-90:]


# --- command line ---------------------------------------------------------------------------
def config_spec(flag: Any) -> str:
  """`FILE:ARG --config.KEY=VALUE ...` as given on the command line."""
  overrides = config_flags.get_override_values(flag)
  return " ".join([config_flags.get_config_filename(flag)]
                  + [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()])


def run(config: ml_collections.ConfigDict, spec: str, topology: str, num_slices: int,
        what: tuple[str, ...], suggest_trials: int, json_only: bool) -> int:
  """The command: prints the report (and suggestion); returns the exit status."""
  target = topologies.parse(topology, num_slices)
  log = (lambda line: print(line, file=sys.stderr, flush=True)) if json_only else (
      lambda line: print(line, flush=True))
  try:
    devices = target.devices()
  except Exception as e:  # the compiler plugin is missing or rejects the topology
    package = "tpu-aot" if target.platform == "tpu" else "gpu-aot"
    raise errors.ConfigError(f"cannot create the abstract devices of {target.name} "
                             f"({str(e).strip().splitlines()[0][:200]}); install the "
                             f"compiler with: pip install -e '.[{package}]'") from None
  log(f"mmjax.aot: compiling {', '.join(what)} of {spec} for {target.name} "
      f"({len(devices)} x {devices[0].device_kind}) ...")
  report = check(config, target, what, devices)
  report["config"] = spec
  if not json_only:
    print(format_report(report, spec), flush=True)
  train = report["programs"].get("train")
  if train and not (train["fits"] and train["headroom_fraction"] >= HEADROOM_TARGET):
    report["advice"] = knob_advice(report)
    if not json_only:
      print("\nto lower the train step's memory, turn:\n" + "\n".join(
          f"  {a}" for a in report["advice"]), flush=True)
    if suggest_trials > 0:
      report["suggestion"] = suggest(config, target, report, devices, suggest_trials, log)
      s = report["suggestion"]
      log("suggestion: " + (f"{s['flags']} fits with {_gib(s['memory_per_device_bytes'])} GiB"
                            f" per device, headroom {100 * s['headroom_fraction']:.1f}%"
                            if s else f"none of the first {suggest_trials} candidates fits "
                                      "with 10% headroom"))
  print(json.dumps(report, default=str), flush=True)
  return 0 if report["fits"] else 1


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  what = tuple(w.strip() for w in f.what.split(",") if w.strip())
  if not what or set(what) - set(PROGRAMS):
    raise errors.UsageError(f"--what={f.what!r}: choose from {','.join(PROGRAMS)}")
  sys.exit(run(f.config, config_spec(f["config"]), f.topology, f.num_slices, what,
               f.suggest_trials if f.suggest else 0, f.json))


def define_flags() -> None:
  """The command's own flags; --config (e.g. configs/coca.py:base,v4_32) comes with the
  command skeleton (mmjax.command.run)."""
  flags.DEFINE_string("topology", None, "Target: v4-32, v5e-16, v5p-128, v6e-8, h100x8, "
                      "h200x8, a100x8, h100x8x4 (4 nodes), ... (see mmjax/topologies.py)")
  flags.DEFINE_integer("num_slices", 1, "TPU multislice: this many slices over DCN.")
  flags.DEFINE_string("what", "train", "Programs to compile: train,eval,decode.")
  flags.DEFINE_bool("json", False, "Print only the JSON object (progress goes to stderr).")
  flags.DEFINE_bool("suggest", False, "Not fitting with 10% headroom: compile candidate "
                    "overrides (grad_accum_steps, remat, mesh) until one does.")
  flags.DEFINE_integer("suggest_trials", 3, "With --suggest: at most this many compiles.")


if __name__ == "__main__":
  define_flags()
  # Compile-only (cpu_only): the host backend is the CPU, whatever accelerator plugin is
  # installed. A usage or config error (unknown topology, mesh vs devices) is one line, exit
  # status 2.
  command.run(main, "mmjax.aot", required=("topology",), cpu_only=True)
