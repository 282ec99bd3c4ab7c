"""What scanning the layer stack costs on a CPU: scanned (before / after) vs unrolled.

  PYTHONPATH=. nice -n 10 python benchmarks/scan_overhead.py [--depth 6] [--batch 8] \
      [--steps 7] [--compile_depths 3,12]

Model: configs/openclip.py:coca_vit_b32 (CoCa-B/32: ViT-B/32 at 224 px, 512-wide text
decoders, 49,408 vocabulary, float32) with `--depth` layers in each of its three stacks
(vision, unimodal, multimodal; 12 = the real B/32), batch `--batch`, one CPU device, the
real train step (`runtime.build(...).jit_train_step()`: forward, backward, AdamW,
donated state). Variants:
  unrolled          model.scan_layers=False
  scanned_before    scan_layers=True, remat_policy=none as it was: no remat, so every
                    residual of the backward is stacked per layer by the scan
                    (`layers.SCANNED_NONE_POLICY` set to "none" for this variant)
  scanned           scan_layers=True, remat_policy=none as shipped: layers.SCANNED_NONE_POLICY
Per variant: compile seconds; the compiled HLO's data-movement ops (dynamic-update-slice,
dynamic-slice, copy, transpose, broadcast: count and MiB written per step, inside while
loops x trip count and outside; a fusion counts as its data-movement op when it contains
one and no matmul); step time. Steps are interleaved across variants (the machine is
shared) and reported as medians of wall seconds and of this process's CPU seconds (user +
system: less sensitive to other jobs on the cores than wall time). `--compile_depths`
compiles the scanned step (abstract, nothing run) at other depths: compile time should not
grow with depth. Prints `lscpu`'s model and ISA flags and the load average. The last line
is one JSON object.
"""
import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import time

import jax
import numpy as np

import common  # benchmarks/common.py: the one-device train-step runner
from configs import openclip as openclip_configs
from mmjax import runtime
from mmjax.models import layers

VARIANTS = {  # name -> (scan_layers, layers.SCANNED_NONE_POLICY while building it)
    "unrolled": (False, layers.SCANNED_NONE_POLICY),
    "scanned_before": (True, "none"),
    "scanned": (True, layers.SCANNED_NONE_POLICY),
}
MOVES = ("dynamic-update-slice", "dynamic-slice", "copy", "transpose", "broadcast")
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2,
               "f16": 2, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}


def config(depth: int, batch: int, scan: bool):
  c = openclip_configs.get_config("coca_vit_b32")
  c.unlock()
  c.batch_size = batch
  c.mesh.shape = (1, 1, 1)
  c.model.scan_layers = scan
  c.model.vision.depth = depth
  c.model.text.update(num_uni_layers=depth, num_multi_layers=depth)
  c.lock()
  return c


def build(variant: str, depth: int, batch: int):
  """(run, compile seconds, compiled HLO text) of the variant's real train step."""
  scan, policy = VARIANTS[variant]
  saved, layers.SCANNED_NONE_POLICY = layers.SCANNED_NONE_POLICY, policy
  try:
    run, compile_s = common.mmjax_runner(config(depth, batch, scan))
  finally:
    layers.SCANNED_NONE_POLICY = saved
  return run, compile_s, run.compiled.as_text()


# --- compiled-HLO accounting ------------------------------------------------------------
def _computations(hlo: str) -> dict[str, list[str]]:
  comps, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = comps.setdefault(header.group(2), [])
      if header.group(1):
        comps["__entry__"] = [header.group(2)]
    elif line.startswith("}"):
      current = None
    elif current is not None and line.strip():
      current.append(line.strip())
  return comps


_INSTR = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")


def _bytes(shape: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    total += DTYPE_BYTES.get(dtype, 0) * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def _move_kind(comps, op: str, shape: str, rest: str) -> tuple[str | None, int]:
  """(data-movement kind or None, bytes written) of one instruction."""
  if op in MOVES:
    return op, _bytes(shape)
  if op != "fusion":
    return None, 0
  called = re.search(r"calls=%?([\w.\-]+)", rest).group(1)
  inner = [m.groups() for m in map(_INSTR.match, comps.get(called, [])) if m]
  kinds = {i[2] for i in inner}
  if kinds & {"dot", "convolution", "custom-call"}:
    return None, 0
  if "dynamic-update-slice" in kinds:  # in place: writes only the update
    shapes = {name: s for name, s, _, _ in inner}
    update = [re.findall(r"%([\w.\-]+)", r)[1] for _, _, o, r in inner
              if o == "dynamic-update-slice"][0]
    return "dynamic-update-slice", _bytes(shapes.get(update, ""))
  for kind in ("dynamic-slice", "transpose", "copy", "broadcast"):
    if kind in kinds and kinds <= set(MOVES) | {"parameter", "bitcast", "constant", "reshape",
                                                "slice", "convert"}:
      return kind, _bytes(shape)
  return None, 0


def data_movement(hlo: str) -> dict[str, float]:
  """{'<where>_<kind>_count' / '_mib'}: where = loop (inside while bodies, x trip count)
  or top."""
  comps = _computations(hlo)
  counts, written = collections.Counter(), collections.Counter()

  def visit(name: str, trips: int, where: str) -> None:
    for line in comps[name]:
      m = _INSTR.match(line)
      if not m:
        continue
      _, shape, op, rest = m.groups()
      if op == "while":
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
        visit(body, trips * (int(trip.group(1)) if trip else 1), "loop")
      elif op in ("call", "conditional"):
        for called in re.findall(r"(?:to_apply|branch_computations)=\{?%?([\w.\-]+)", rest):
          visit(called, trips, where)
      else:
        kind, size = _move_kind(comps, op, shape, rest)
        if kind:
          counts[(where, kind)] += trips
          written[(where, kind)] += size * trips

  visit(comps["__entry__"][0], 1, "top")
  out = {}
  for where, kind in sorted(counts):
    key = f"{where}_{kind.replace('-', '_')}"
    out[f"{key}_count"] = counts[(where, kind)]
    out[f"{key}_mib"] = round(written[(where, kind)] / 2**20, 1)
  out["total_moved_mib"] = round(sum(written.values()) / 2**20, 1)
  return out


def compile_seconds(depth: int, batch: int) -> float:
  """Lower + compile the scanned step from abstract state (nothing runs), cache off."""
  rt = runtime.build(config(depth, batch, scan=True), jax.devices()[:1])
  with rt.activate():
    train_step = rt.jit_train_step()
    start = time.perf_counter()
    train_step.lower(rt.abstract_state, rt.abstract_batch()).compile()
  return time.perf_counter() - start


def cpu_description() -> dict[str, str]:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  flags = fields.get("Flags", "").split()
  isa = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
  return {"cpu_model": fields.get("Model name", "?").strip(),
          "cpus": fields.get("CPU(s)", "?").strip(), "isa": " ".join(isa)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--depth", type=int, default=6, help="layers per stack (B/32: 12)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=7, help="timed steps per variant")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--compile_depths", default="",
                      help="comma-separated depths to compile the scanned step at")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  results = {"model": "configs/openclip.py:coca_vit_b32", "depth": args.depth,
             "batch": args.batch, "jax": jax.__version__, **cpu_description(),
             "load_avg_start": round(os.getloadavg()[0], 2)}
  print(f"{results['cpu_model']} ({results['cpus']} CPUs; {results['isa']}); "
        f"load average {results['load_avg_start']}", flush=True)

  runners = {}
  for variant in args.variants.split(","):
    runners[variant], compile_s, hlo = build(variant, args.depth, args.batch)
    moved = data_movement(hlo)
    results[f"{variant}_compile_s"] = round(compile_s, 1)
    results.update({f"{variant}_{k}": v for k, v in moved.items()})
    print(f"{variant}: compiled in {compile_s:.1f} s; data movement {moved}", flush=True)
  for run in runners.values():
    for _ in range(args.warmup):
      run()
  wall, cpu = {v: [] for v in runners}, {v: [] for v in runners}
  for i in range(args.steps):
    for variant, run in runners.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      run()
      wall[variant].append(time.perf_counter() - start)
      cpu[variant].append(time.process_time() - start_cpu)
    print(f"step {i}: " + ", ".join(f"{v} {wall[v][-1]:.2f} s ({cpu[v][-1]:.2f} CPU s)"
                                    for v in runners)
          + f"; load {os.getloadavg()[0]:.1f}", flush=True)
  for variant in runners:
    results[f"{variant}_step_s"] = round(statistics.median(wall[variant]), 3)
    results[f"{variant}_step_cpu_s"] = round(statistics.median(cpu[variant]), 3)
  if "unrolled" in runners:
    for variant in runners:
      for kind in ("step_s", "step_cpu_s"):
        results[f"{variant}_over_unrolled_{kind}"] = round(
            results[f"{variant}_{kind}"] / results[f"unrolled_{kind}"], 3)
  for depth in filter(None, args.compile_depths.split(",")):
    results[f"scanned_compile_s_depth_{depth}"] = round(compile_seconds(int(depth),
                                                                        args.batch), 1)
    print(f"scanned, depth {depth}: compiled in "
          f"{results[f'scanned_compile_s_depth_{depth}']} s", flush=True)
  results["load_avg_end"] = round(os.getloadavg()[0], 2)
  print(f"\nmedians of {args.steps} interleaved steps (wall s / CPU s):")
  for variant in runners:
    print(f"  {variant:16s} {results[f'{variant}_step_s']:8.2f} "
          f"{results[f'{variant}_step_cpu_s']:8.2f}   moved "
          f"{results[f'{variant}_total_moved_mib']:9.1f} MiB")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
