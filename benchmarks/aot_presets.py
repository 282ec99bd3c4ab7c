"""Ahead-of-time compile of every mesh preset for its target: memory, headroom, FLOPs, time.

  PYTHONPATH=. python benchmarks/aot_presets.py [--only base,v4_32] [--write]

Each row is one `python -m mmjax.aot --config SPEC --topology TARGET --json` run in a fresh
process (sequential: a CoCa train step takes minutes of CPU to compile): the real train
step at the preset's own batch, micro-batch (grad_accum_steps), remat policy and mesh,
compiled by libtpu / XLA:GPU for abstract devices. `--write` puts the rows into the section
between the markers in benchmarks/RESULTS.md (command, versions, host CPU, the table; each
row dated), replacing those presets' rows and keeping the others. The last stdout line is
one JSON list with every row's figures. Needs `pip install -e
'.[tpu-aot,gpu-aot]'`.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

from configs import coca
from mmjax import topologies

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "RESULTS.md")
BEGIN, END = "<!-- aot_presets:begin -->", "<!-- aot_presets:end -->"
GiB = 2**30

# (config spec, target): every mesh preset of configs/coca.py on the target it names;
# FLAVA full (no mesh preset: its default mesh, data parallel over all devices) on the two
# targets the CoCa presets use most.
PRESETS = [(f"configs/coca.py:{variant},{mesh}", topologies.preset_target(mesh))
           for variant in ("base", "large", "giant") for mesh in coca.MESHES]
PRESETS += [("configs/flava.py:full", "v4-32"), ("configs/flava.py:full", "h100x8")]


def run_one(spec: str, target: str, timeout_s: int, *overrides: str) -> dict:
  """One mmjax.aot run in a fresh process (`overrides`: `--config.KEY=VALUE` flags); its JSON
  report (or the error)."""
  command = [sys.executable, "-m", "mmjax.aot", "--config", spec, "--topology", target,
             "--json", *overrides]
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
  wall_s = time.perf_counter() - start
  lines = proc.stdout.strip().splitlines()
  if proc.returncode in (0, 1) and lines:
    report = json.loads(lines[-1])
    report["wall_s"] = round(wall_s, 1)
    return report
  lines = proc.stderr.strip().splitlines() or ["(no output)"]
  error = next((l for l in reversed(lines) if "Error" in l or "error:" in l), lines[-1])
  return dict(config=spec, topology=target, error=error.strip()[:300],
              stderr_tail=proc.stderr[-3000:], returncode=proc.returncode,
              wall_s=round(wall_s, 1))


def train_program(r: dict) -> dict:
  """The train step's report within an mmjax.aot report ({} for a failed compile)."""
  return (r.get("programs") or {}).get("train") or {}


def collective_bytes(r: dict) -> int | None:
  """Result bytes of every collective in the compiled train step, per device."""
  kinds = train_program(r).get("collectives")
  return sum(v["bytes"] for v in kinds.values()) if kinds else None


def gib_cell(num_bytes: int | None) -> str:
  """A table cell in GiB ("n/a" when the report has no such figure)."""
  return "n/a" if num_bytes is None else f"{num_bytes / GiB:.2f}"


def row(spec: str, target: str, r: dict) -> str:
  name, date = spec.removeprefix("configs/"), datetime.date.today().isoformat()
  if "error" in r:
    return f"| `{name}` | {target} | error: {r['error']} | | | | | | | | | {date} |"
  need, have = r["memory_per_device_bytes"], r["device_memory_bytes"]
  fits = ("yes" if r["fits"] else "**no**") + (
      "" if r["fits"] and r["headroom_fraction"] >= 0.10 else " (< 10%)" if r["fits"] else "")
  ratio = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") else "n/a"
  step = (f"{r['estimated_step_s']:.3g} s" if r.get("estimated_step_s") is not None
          else "dropped" if r["platform"] == "tpu" else "n/a (GPU)")
  return (f"| `{name}` | {target} ({r['num_devices']} x {r['device_kind']}) | "
          f"{r['micro_batch_per_device']:g} x {r['grad_accum_steps']} | {r['remat_policy']} | "
          f"{need / GiB:.2f} / {have / GiB:.2f} | {100 * r['headroom_fraction']:.1f}% | "
          f"{fits} | {ratio} | {gib_cell(collective_bytes(r))} | {step} | "
          f"{r['lower_s'] + r['compile_s']:.0f} s | {date} |")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    model = "unknown CPU"
  return f"{model}, {os.cpu_count()} cores"


_ROW_KEY = re.compile(r"^\| `([^`]+)` \| (\S+)")


def section(rows: dict[tuple[str, str], str], versions: dict[str, str]) -> str:
  """The RESULTS.md section: how the rows were made, then one row per (preset, target) in
  PRESETS order (each row carries the date it was measured)."""
  lines = [
      BEGIN,
      "## Presets compiled ahead of time (`benchmarks/aot_presets.py`)",
      "",
      "`PYTHONPATH=. python benchmarks/aot_presets.py --write` (all rows; `--only PRESET` "
      "re-measures one row) on the development machine "
      f"({cpu_model()}; compiles for the targets, no accelerator). Versions: "
      + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
      "Each row compiles the real train step (`python -m mmjax.aot --config SPEC --topology "
      "TARGET`) at the preset's batch, micro-batch, remat policy and mesh. Memory is per "
      "device: arguments + temporaries + outputs not aliased, against the TPU compiler's "
      "available HBM or 90% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION of "
      "launch/gpu.sh); `compiled/model` is the matmul FLOPs in the compiled HLO (loops x "
      "trip count) over `mmjax.summary`'s model FLOPs: the recompute of remat and of "
      "gradient caching's embedding pass. Collectives: result bytes of every collective "
      "in the step per device (loops x trip count). Step time: the TPU cost model's "
      "estimate when plausible (`dropped` when negative or faster than the compiled FLOPs "
      "at peak); XLA:GPU has none.",
      "",
      "| preset | target | micro-batch per device x steps | remat | memory / capacity "
      "(GiB) | headroom | fits | compiled/model FLOPs | collectives (GiB) | est. step time | "
      "compile (lower + compile) | date |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  order = {(s.removeprefix("configs/"), t): i for i, (s, t) in enumerate(PRESETS)}
  lines += [rows[k] for k in sorted(rows, key=lambda k: order.get(k, len(order)))]
  lines.append(END)
  return "\n".join(lines)


def write_rows(new_rows: dict[tuple[str, str], str], versions: dict[str, str]) -> str:
  """Replaces those rows of the RESULTS.md section (kept: the others); returns the section."""
  with open(RESULTS) as f:
    current = f.read()
  head, _, rest = current.partition(BEGIN)
  old, _, tail = rest.partition(END)
  rows = {}
  for line in old.splitlines():
    match = _ROW_KEY.match(line)
    if match:
      rows[match[1], match[2]] = line
  rows.update(new_rows)
  text = section(rows, versions)
  if not rest:
    head, tail = current.rstrip("\n") + "\n\n", "\n"
  with open(RESULTS, "w") as f:
    f.write(head + text + tail)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated substrings of "
                      "'SPEC TARGET' to run, e.g. base,v4-32 (default: every preset)")
  parser.add_argument("--timeout_s", type=int, default=7200, help="per preset")
  parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
  args = parser.parse_args()
  wanted = [w for w in args.only.split(",") if w]
  chosen = [(s, t) for s, t in PRESETS if all(w in f"{s} {t}" for w in wanted)]
  results = []
  for spec, target in chosen:
    print(f"aot_presets: {spec} on {target} ...", file=sys.stderr, flush=True)
    r = run_one(spec, target, args.timeout_s)
    results.append((spec, target, r))
    print(row(spec, target, r), flush=True)
  rows = {(s.removeprefix("configs/"), t): row(s, t, r) for s, t, r in results}
  versions = next((r["versions"] for _, _, r in results if "versions" in r), {})
  print(write_rows(rows, versions) if args.write else section(rows, versions))
  print(json.dumps([dict(config=s, topology=t, **{k: r.get(k) for k in (
      "fits", "memory_per_device_bytes", "device_memory_bytes", "headroom_fraction",
      "micro_batch_per_device", "grad_accum_steps", "remat_policy", "flops_ratio",
      "estimated_step_s", "lower_s", "compile_s", "error")},
      collective_bytes=collective_bytes(r)) for s, t, r in results]))


if __name__ == "__main__":
  main()
