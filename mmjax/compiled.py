"""What a compiled XLA program costs: compile with an XLA dump and read it (the largest
buffers live at the memory peak, the buffer assignment's totals, also when the compiler
refuses the program), per-device memory split into parameters / optimizer state / batch /
temporaries, compiled FLOPs and collectives (`mmjax.hlo`), the TPU cost model's step time,
and `memory_line`, the train step's memory that `mmjax.train` prints at start-up.

`mmjax.aot` (the ahead-of-time report and its `--suggest` search) and `mmjax.train` use it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from mmjax import hlo, topologies

GiB = 2**30
GPU_COMPILE_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


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


# --- memory and cost figures ---------------------------------------------------------------
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
  peak = topologies.peak_flops_per_device(device_kind)
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
  capacity = (f"of {format_size(limit)} on {device.device_kind} ({100 * total / limit:.0f}%)"
              if limit else f"(device capacity unknown on {device.platform})")
  return (f"Train step memory per device: {format_size(total)} (arguments "
          f"{format_size(m.argument_size_in_bytes)}, temporaries "
          f"{format_size(m.temp_size_in_bytes)}) "
          f"{capacity}")


def format_size(n: float | None) -> str:
  """Bytes for people: GiB above 1 GiB, else MiB."""
  if n is None:
    return "?"
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"
