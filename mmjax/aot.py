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
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from mmjax import cli, decode, errors, evaluators, hlo, models, runtime, sharding, summary
from mmjax import command, topologies

GiB = 2**30
# Without a GPU to autotune on, XLA:GPU can fail to tile a Triton GEMM fusion ("Couldn't
# find output tile sizes", CoCa-Base micro-batch 256 on h100x8); cuBLAS GEMMs need no tiling.
GPU_COMPILE_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
HEADROOM_TARGET = 0.10  # presets must keep 10% of device memory free
PROGRAMS = ("train", "eval", "decode")


# --- the programs ---------------------------------------------------------------------------
def _eval_programs(rt: runtime.Runtime) -> dict[str, tuple]:
  """The evaluators' image and text embedding programs (`evaluators.Embedder`) at
  eval_batch_size: name -> (lowered, abstract inputs besides the parameters)."""
  config = rt.config
  embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, config.eval_batch_size)
  spec = {k: v for k, v in rt.abstract_batch(embedder.batch_size).items()
          if k in ("image", "text", "text_type")}
  params = rt.abstract_state.params
  with rt.activate():
    return {"eval_image": (embedder._image.lower(params, spec["image"]), spec["image"]),
            "eval_text": (embedder._text.lower(params, spec["text"], spec["text_type"]),
                          (spec["text"], spec["text_type"]))}


def _decode_programs(rt: runtime.Runtime, entry: ml_collections.ConfigDict) -> dict[str, tuple]:
  """The K/V-cached captioning decoder of the captioning evaluator `entry`, at
  eval_batch_size: name -> (lowered, abstract images)."""
  config = rt.config
  captioner = decode.make_captioner(rt.model, decode.DecodeConfig(
      strategy=entry.strategy, max_new_tokens=entry.max_new_tokens,
      beam_size=entry.beam_size, length_penalty=entry.length_penalty))
  batch_size = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules,
                                   config.eval_batch_size).batch_size
  images = rt.abstract_batch(batch_size)["image"]
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(rt.mesh))
  with rt.activate():
    return {"decode": (captioner.lower(rt.abstract_state.params, images, rng), images)}


# --- compiling ------------------------------------------------------------------------------
@dataclasses.dataclass
class CompileResult:
  """One program compiled for the target: the executable, or the compiler's refusal."""
  name: str
  compiled: Any | None  # jax.stages.Compiled; None when the compiler ran out of memory
  out_of_memory: str | None  # the RESOURCE_EXHAUSTED message
  lower_s: float
  compile_s: float
  hlo_text: str  # optimised HLO (on an out-of-memory failure: the compiler's last module)
  peak_buffers: list[dict]  # largest values live at the peak: bytes, shape, op
  dumped_memory: dict | None  # argument/output/temp bytes from the dumped buffer assignment


def compile_lowered(name: str, lowered: Any, lower_s: float, platform: str) -> CompileResult:
  """Compiles with an XLA dump to a temporary directory: its buffer assignment and live
  ranges name the largest buffers at the memory peak, also when the compiler gives up."""
  with tempfile.TemporaryDirectory(prefix="mmjax_aot_") as dump:
    options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True}
    if platform == "gpu":
      options["xla_gpu_dump_llvmir"] = False
      options.update(GPU_COMPILE_OPTIONS)
    start = time.perf_counter()
    compiled, oom = None, None
    # A compile-only executable cannot be read back from the persistent cache: skip it.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
      compiled = lowered.compile(compiler_options=options)
    except Exception as e:  # jax.errors.JaxRuntimeError
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      oom = str(e).strip().splitlines()[0]
    finally:
      jax.config.update("jax_enable_compilation_cache", cache)
    compile_s = time.perf_counter() - start
    files = _dumped_files(dump)
    hlo_text = (compiled.as_text() if compiled is not None
                else _read(files.get("oom_intermediate_module.txt")
                           or files.get("after_optimizations.txt")))
    peak = _peak_buffers(_read(files.get("live-range.txt")), hlo_text)
    dumped = _buffer_assignment_totals(_read(files.get("buffer-assignment.txt")),
                                       _read(files.get("memory-usage-report.txt")))
  return CompileResult(name, compiled, oom, lower_s, compile_s, hlo_text, peak, dumped)


def _dumped_files(directory: str) -> dict[str, str]:
  """Suffix -> path of the dumped files of the (last) module: the compiled program."""
  out = {}
  for name in sorted(os.listdir(directory)):
    for suffix in ("oom_intermediate_module.txt", "after_optimizations.txt",
                   "after_optimizations-live-range.txt",
                   "after_optimizations-buffer-assignment.txt",
                   "after_optimizations-memory-usage-report.txt"):
      if name.endswith(suffix):
        key = suffix.removeprefix("after_optimizations-")
        out[key] = os.path.join(directory, name)
  return out


def _read(path: str | None) -> str:
  if not path:
    return ""
  with open(path) as f:
    return f.read()


_LIVE = re.compile(r"^\s+(\S+?)(\{[0-9,]*\})?: (\d+) bytes \(cumulative")


def _peak_buffers(live_ranges: str, hlo_text: str, top: int = 8) -> list[dict]:
  """The largest buffers live at the memory peak (`Live ranges at N (peak):` of the dumped
  live ranges), each with its shape and the source-level op that defines it."""
  _, _, section = live_ranges.partition("(peak):")
  values = []
  for line in section.splitlines()[1:]:
    match = _LIVE.match(line)
    if not match:
      break
    values.append((int(match[3]), match[1], match[2] or ""))
  values.sort(reverse=True)
  info = _instruction_info(hlo_text, {name for _, name, _ in values[:top]})
  return [dict(bytes=size, value=name + index, **info.get(name, {}))
          for size, name, index in values[:top]]


def _instruction_info(hlo_text: str, names: set[str]) -> dict[str, dict]:
  """name -> {shape, op} for instructions of the HLO text (op: the metadata op_name)."""
  out = {}
  for instructions in hlo.parse_module(hlo_text)[0].values() if hlo_text else ():
    for i in instructions:
      if i.name in names and i.name not in out:
        op = re.search(r'op_name="([^"]*)"', i.attrs)
        out[i.name] = dict(shape=re.sub(r"\{[^}]*\}", "", i.shape)[:80],
                           op=op[1].replace("\\'", "'") if op else "")
  return out


def _buffer_assignment_totals(assignment: str, usage_report: str) -> dict | None:
  """The compiler's accounting of device memory (color 0) from its dumped buffer
  assignment, also when it refused the program: argument allocations, output allocations
  that are not donated arguments, everything else (temporaries, thread-local scratch,
  constants), their sum, and the memory-usage report's total (the figure the TPU compiler
  checks against its HBM; equal to the sum)."""
  if not assignment:
    return None
  totals = dict(argument=0, output_not_aliased=0, temp=0)
  for match in re.finditer(r"^allocation \d+: size (\d+), (.*):$", assignment, re.M):
    size, kind = int(match[1]), match[2]
    if "color " in kind:  # other memory spaces: VMEM, CMEM, SMEM, host
      continue
    key = ("argument" if kind.startswith("parameter") else
           "output_not_aliased" if "output shape" in kind or "maybe-live-out" in kind
           else "temp")
    totals[key] += size
  totals["total"] = sum(totals.values())
  report = re.search(r"Memory Space: default \(color=0\)\nTotal bytes: (\d+)", usage_report)
  totals["usage_report_total"] = int(report[1]) if report else None
  return totals


# --- the report -----------------------------------------------------------------------------
def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def memory_parts(result: CompileResult, arguments: dict[str, Any]) -> dict[str, int]:
  """Per-device bytes: the named argument groups, the compiler's argument bytes minus their
  sum, temporaries and outputs not aliased to donated inputs; `total` is their sum. The
  compiler's figures come from its buffer assignment when dumped (the accounting it checks
  against device memory), else from `memory_analysis()`."""
  parts = {name: shard_bytes(tree) for name, tree in arguments.items()}
  compiler = result.dumped_memory
  if compiler is None and result.compiled is not None:
    m = result.compiled.memory_analysis()
    compiler = dict(argument=m.argument_size_in_bytes, temp=m.temp_size_in_bytes,
                    output_not_aliased=m.output_size_in_bytes - m.alias_size_in_bytes)
  if compiler is None:
    return {**parts, "total": None}
  parts["argument_adjustment"] = compiler["argument"] - sum(parts.values())
  parts["temporaries"] = compiler["temp"]
  parts["outputs_not_aliased"] = compiler["output_not_aliased"]
  parts["total"] = sum(parts.values())
  return parts


def _memory_analysis(compiled: Any) -> dict[str, int] | None:
  """`compiled.memory_analysis()` as a dict (on TPU it can leave out small temporaries the
  buffer assignment has)."""
  m = compiled.memory_analysis() if compiled is not None else None
  if m is None:
    return None
  return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
              alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
              peak=getattr(m, "peak_memory_in_bytes", None),
              host_temp=getattr(m, "host_temp_size_in_bytes", None))


_OOM_FIGURES = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds "
                          r"available HBM \(([\d.]+)([KMGT])\)")


def program_report(result: CompileResult, arguments: dict[str, Any], capacity: int,
                   device_kind: str, model_flops_per_device: float | None) -> dict[str, Any]:
  """The JSON-ready figures of one compiled program (see the module docstring)."""
  memory = memory_parts(result, arguments)
  total = memory["total"]
  figures = _OOM_FIGURES.search(result.out_of_memory or "")
  if figures:
    capacity = topologies.parse_gib_figure(*figures.groups()[2:])
    if total is None:  # no dump: the message's figure, rounded to 0.01 GiB
      total = topologies.parse_gib_figure(*figures.groups()[:2])
  fits = result.compiled is not None and total is not None and total <= capacity
  stats = hlo.analyze(result.hlo_text) if result.hlo_text else None
  report = dict(
      program=result.name, fits=fits, memory_per_device_bytes=total,
      device_memory_bytes=capacity,
      headroom_fraction=None if total is None else (capacity - total) / capacity,
      memory=memory, peak_buffers=result.peak_buffers, compiler_error=result.out_of_memory,
      buffer_assignment=result.dumped_memory,
      memory_analysis=_memory_analysis(result.compiled),
      lower_s=round(result.lower_s, 2), compile_s=round(result.compile_s, 2),
      compiled_flops_per_device=stats.matmul_flops if stats else None,
      model_flops_per_device=model_flops_per_device,
      collectives=stats.collectives_json() if stats else {},
      while_loops_of_unknown_trip_count=stats.unknown_trip_counts if stats else None)
  report["flops_ratio"] = (report["compiled_flops_per_device"] / model_flops_per_device
                           if model_flops_per_device and report["compiled_flops_per_device"]
                           else None)
  report.update(_cost_model_estimate(result, device_kind, report["compiled_flops_per_device"],
                                     model_flops_per_device))
  return report


def _cost_model_estimate(result: CompileResult, device_kind: str, compiled_flops: int | None,
                         model_flops: float | None) -> dict[str, Any]:
  """XLA:TPU's cost-model step time and the MFU it implies, when plausible."""
  out = dict(estimated_step_s=None, estimated_mfu=None, estimate_note="")
  cost = result.compiled.cost_analysis() if result.compiled is not None else None
  cost = cost[0] if isinstance(cost, list) else cost
  if not cost or "optimal_seconds" not in cost:
    out["estimate_note"] = "the compiler gives no cost-model estimate for this target"
    return out
  seconds = float(cost["optimal_seconds"])
  peak = summary.peak_flops_per_device(device_kind)
  floor = compiled_flops / peak if compiled_flops and peak else 0.0
  if seconds <= 0 or seconds < floor:
    out["estimate_note"] = (f"cost-model estimate {seconds:.4g} s dropped: "
                            + ("not positive" if seconds <= 0 else
                               f"faster than the compiled FLOPs at peak ({floor:.4g} s)"))
    return out
  out["estimated_step_s"] = seconds
  if model_flops and peak:
    out["estimated_mfu"] = model_flops / (seconds * peak)
  out["estimate_note"] = "XLA cost-model estimate, not a measurement"
  return out


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
    result = compile_lowered("train", lowered, lower_s, target.platform)
    model_flops = summary.model_flops_per_example(config) * config.batch_size / len(devices)
    state = rt.abstract_state
    programs["train"] = program_report(
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
    result = compile_lowered(name, lowered_program, seconds, target.platform)
    programs[name] = program_report(result, inputs, capacity_bytes, device_kind, None)
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


def _size(n: float | None) -> str:
  """Bytes for people: GiB above 1 GiB, else MiB."""
  if n is None:
    return "?"
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


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
      lines.append(f"    {label:30s} {_size(p['memory'][key]):>12s}")
  if p["compiler_error"]:
    lines.append(f"  compiler: {p['compiler_error']}")
  lines.append(f"  device memory {_size(p['device_memory_bytes'])} "
               f"({report['device_memory_source']})")
  if p["memory_per_device_bytes"] is not None:
    need, have = p["memory_per_device_bytes"], p["device_memory_bytes"]
    if p["fits"]:
      flag = "" if p["headroom_fraction"] >= HEADROOM_TARGET else " (below the 10% target)"
      lines.append(f"  fits: yes, headroom {_size(have - need)} = "
                   f"{100 * p['headroom_fraction']:.1f}%{flag}")
    else:
      lines.append(f"  fits: NO, short by {_size(need - have)} "
                   f"({100 * (need - have) / have:.1f}% over)")
  if p["peak_buffers"]:
    lines.append("  largest buffers live at the memory peak:")
    for b in p["peak_buffers"][:6]:
      lines.append(f"    {_size(b['bytes']):>12s}  {b.get('shape', '')[:36]:36s} "
                   f"{_short_op(b.get('op') or b['value'])}")
  lines += _flops_lines(p)
  if p["collectives"]:
    unknown = p["while_loops_of_unknown_trip_count"]
    scope = ("per step" if not unknown else
             f"per step, ops in {unknown} loop(s) of unknown trip count counted once")
    lines.append(f"  collectives ({scope}): " + ", ".join(
        f"{k} {v['count']}x {_size(v['bytes'])}" for k, v in p["collectives"].items()))
  lines.append(f"  lower {p['lower_s']:.1f} s, compile {p['compile_s']:.1f} s")
  return lines


def _flops_lines(p: dict[str, Any]) -> list[str]:
  compiled, model = p["compiled_flops_per_device"], p["model_flops_per_device"]
  if compiled is None:
    return []
  line = f"  matmul FLOPs per device: compiled {compiled:.4g}"
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


# --- mmjax.train's start-up line -------------------------------------------------------------
def memory_line(compiled: Any, device: Any) -> str:
  """The compiled train step's memory per device against the device's capacity (one line,
  any backend; CPUs report no capacity)."""
  m = compiled.memory_analysis()
  if m is None:
    return f"Train step memory per device: not reported by the {device.platform} compiler"
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  capacity = (f"of {_size(limit)} on {device.device_kind} ({100 * total / limit:.0f}%)"
              if limit else f"(device capacity unknown on {device.platform})")
  return (f"Train step memory per device: {_size(total)} (arguments "
          f"{_size(m.argument_size_in_bytes)}, temporaries {_size(m.temp_size_in_bytes)}) "
          f"{capacity}")


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
