"""What a locked image tower (optimizer.frozen, LiT) saves on a pod preset, both variants
side by side in one run.

  PYTHONPATH=. python benchmarks/locked_towers.py [--topology v4-8] [--batch 32] \
      [--case SPEC=FROZEN_REGEX ...]   # default: CoCa-Base and a ViT-B/16 CLIP (LiT)

For each (config, frozen pattern): one `python -m mmjax.aot --config SPEC --topology
TOPOLOGY --json --config.batch_size=BATCH --config.grad_accum_steps=1` without a lock and
one with `--config.optimizer.frozen=PATTERN`, each in a fresh process: the real train step
(forward, backward, AdamW) compiled by the TPU compiler for the topology's abstract devices.
Reported per variant: compiled matmul FLOPs per example (`mmjax.hlo`, every scanned loop
times its trip count), memory per device and its parts (arguments hold the parameters and
the optimizer state). A locked tower has no backward pass and no AdamW moments, so both
shrink. The last line is one JSON object.
"""
import argparse
import json
import os

import aot_presets  # benchmarks/aot_presets.py
from configs import finetune

# (config, the image tower's parameters): CoCa's ViT, the two-tower's ViT + MAP head + proj.
CASES = (("configs/coca.py:base", "vision/.*"),
         ("configs/pretrained.py:openai_vit_b16", finetune.TWO_TOWER_IMAGE))


def compile_report(spec: str, topology: str, batch: int, frozen: str) -> dict:
  overrides = [f"--config.batch_size={batch}", "--config.grad_accum_steps=1"]
  if frozen:
    overrides.append(f"--config.optimizer.frozen={frozen}")
  report = aot_presets.run_one(spec, topology, 3600, *overrides)
  if "error" in report:
    raise RuntimeError(f"mmjax.aot {spec} frozen={frozen!r}: {report['error']}\n"
                       + report.get("stderr_tail", ""))
  devices = report["num_devices"]
  return {"compiled_flops_per_example": report["compiled_flops_per_device"] * devices / batch,
          "memory_per_device_bytes": report["memory_per_device_bytes"],
          "memory_parts_bytes": report["programs"]["train"]["memory"],
          "compile_s": report["programs"]["train"]["compile_s"]}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--topology", default="v4-8")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--case", action="append", default=[],
                      help="SPEC=FROZEN_REGEX (repeatable); default: CASES")
  args = parser.parse_args()
  cases = [tuple(c.split("=", 1)) for c in args.case] or CASES
  rows = {}
  for spec, pattern in cases:
    rows[spec] = {"frozen": pattern}
    for name, frozen in (("trained", ""), ("locked", pattern)):
      r = rows[spec][name] = compile_report(spec, args.topology, args.batch, frozen)
      parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r["memory_parts_bytes"].items()
                        if isinstance(v, (int, float)))
      print(f"{spec} image tower {name}: {r['compiled_flops_per_example'] / 1e9:.2f} GFLOP per "
            f"example, {r['memory_per_device_bytes'] / 2**30:.2f} GiB per device ({parts} GiB); "
            f"compile {r['compile_s']:.0f} s", flush=True)
    for ratio, key in (("flops_ratio", "compiled_flops_per_example"),
                       ("memory_ratio", "memory_per_device_bytes")):
      rows[spec][ratio] = rows[spec]["locked"][key] / rows[spec]["trained"][key]
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), "unknown")
  print(json.dumps({"topology": args.topology, "batch": args.batch, "cpu": cpu,
                    "load": os.getloadavg()[0], "configs": rows}))


if __name__ == "__main__":
  main()
