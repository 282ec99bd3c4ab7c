"""What patch dropout (model.patch_dropout, FLIP) saves, both variants side by side in one run.

  # compiled train-step FLOPs per example, CoCa-Base and a ViT-B/16 CLIP (mmjax.aot):
  PYTHONPATH=. python benchmarks/patch_dropout.py flops \
      [--configs configs/coca.py:base,configs/pretrained.py:openai_vit_b16] \
      [--topology v4-8] [--batch 32] [--fraction 0.5]
  # CPU step time of the shapes job's model, steps of the two variants interleaved:
  PYTHONPATH=. nice -n 10 python benchmarks/patch_dropout.py time \
      [--config configs/shapes.py] [--batch 64] [--rounds 20] [--fraction 0.5] [--depth N]

flops: for each config and each of patch_dropout 0 and --fraction, one `python -m mmjax.aot
--config SPEC --topology TOPOLOGY --json --config.batch_size=BATCH
--config.grad_accum_steps=1 --config.model.patch_dropout=F` in a fresh process: the real
train step (forward, backward, AdamW) compiled by the TPU compiler for the topology's
abstract devices, its matmul FLOPs counted in the compiled HLO with every while loop (the
scanned layers) multiplied by its trip count (`mmjax.hlo`), times the devices, divided by
the batch: per example. (XLA's cost analysis of a lowered program counts a loop's body once:
with scanned layers it undercounts a 12-layer stack 12 times.)
time: the real jitted train step (benchmarks/common.py) of `--config` on one CPU device for
both variants, compiled first, then `--rounds` rounds of one step each, the order of the
two alternating every round (ABBA) so the shared machine's load drifts over both alike;
the median step of each and the median of the per-round ratios. Prints the CPU model and
the load average. Each mode's last line is one JSON object.
"""
import argparse
import json
import os
import statistics
import time

import jax

import aot_presets  # benchmarks/aot_presets.py
import common  # benchmarks/common.py
from mmjax import cli


def config_for(spec: str, fraction: float, batch: int, depth: int | None = None):
  config = cli.load_config(spec)
  config.unlock()
  config.update_from_flattened_dict({"model.patch_dropout": fraction, "batch_size": batch,
                                     "mesh.shape": (1, 1, 1), "grad_accum_steps": 1})
  if depth:
    config.model.vision.depth = depth
    config.model.text.num_uni_layers = depth
    config.model.text.num_multi_layers = depth
  config.lock()
  return config


def aot_flops(spec: str, fraction: float, topology: str, batch: int) -> dict:
  """One mmjax.aot compile of `spec`'s train step: FLOPs per example (compiled matmuls and
  mmjax.summary's model FLOPs, the latter blind to patch dropout)."""
  report = aot_presets.run_one(spec, topology, 3600, f"--config.batch_size={batch}",
                               "--config.grad_accum_steps=1",
                               f"--config.model.patch_dropout={fraction}")
  if "error" in report:
    raise RuntimeError(f"mmjax.aot {spec} patch_dropout={fraction}: {report['error']}\n"
                       + report.get("stderr_tail", ""))
  devices = report["num_devices"]
  return {"compiled_flops_per_example": report["compiled_flops_per_device"] * devices / batch,
          "model_flops_per_example": report["model_flops_per_device"] * devices / batch,
          "memory_per_device_bytes": report["memory_per_device_bytes"],
          "compile_s": report["programs"]["train"]["compile_s"], "wall_s": report["wall_s"]}


def flops_mode(args: argparse.Namespace) -> dict:
  fractions = (0.0, args.fraction)
  rows = {}
  for spec in args.configs.split(","):
    rows[spec] = {}
    for f in fractions:
      rows[spec][str(f)] = r = aot_flops(spec, f, args.topology, args.batch)
      print(f"{spec} patch_dropout={f}: {r['compiled_flops_per_example'] / 1e9:.2f} GFLOP "
            f"per example compiled (model {r['model_flops_per_example'] / 1e9:.2f}), "
            f"{r['memory_per_device_bytes'] / 2**30:.2f} GiB per device; compile "
            f"{r['compile_s']:.0f} s", flush=True)
    rows[spec]["flops_ratio"] = (rows[spec][str(args.fraction)]["compiled_flops_per_example"]
                                 / rows[spec]["0.0"]["compiled_flops_per_example"])
    print(f"{spec}: {rows[spec]['flops_ratio']:.3f}x the FLOPs with {args.fraction} dropped",
          flush=True)
  return {"mode": "flops", "topology": args.topology, "batch": args.batch, "configs": rows}


def time_mode(args: argparse.Namespace) -> dict:
  fractions = (0.0, args.fraction)
  runners, compile_s = {}, {}
  for f in fractions:
    runners[f], compile_s[f] = common.mmjax_runner(
        config_for(args.config, f, args.batch, args.depth))
    runners[f]()  # warm-up
  times = {f: [] for f in fractions}
  for i in range(args.rounds):
    for f in (fractions if i % 2 == 0 else fractions[::-1]):
      start = time.perf_counter()
      runners[f]()
      times[f].append(time.perf_counter() - start)
  median = {f: statistics.median(t) for f, t in times.items()}
  ratios = [b / a for a, b in zip(times[0.0], times[args.fraction])]
  for f in fractions:
    print(f"{args.config} batch {args.batch}, patch_dropout={f}: median step "
          f"{median[f]:.3f} s over {args.rounds} (min {min(times[f]):.3f}, max "
          f"{max(times[f]):.3f}; compile {compile_s[f]:.1f} s)", flush=True)
  print(f"step time ratio {args.fraction} / 0: {median[args.fraction] / median[0.0]:.3f} "
        f"(ratio of medians), {statistics.median(ratios):.3f} (median of per-round ratios)",
        flush=True)
  return {"mode": "time", "config": args.config, "batch": args.batch, "depth": args.depth,
          "rounds": args.rounds, "step_seconds": {str(f): times[f] for f in fractions},
          "step_seconds_median": {str(f): median[f] for f in fractions},
          "step_time_ratio": median[args.fraction] / median[0.0],
          "step_time_ratio_paired_median": statistics.median(ratios)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("flops", "time"))
  parser.add_argument("--fraction", type=float, default=0.5)
  parser.add_argument("--configs", default="configs/coca.py:base,"
                      "configs/pretrained.py:openai_vit_b16", help="flops: comma-separated")
  parser.add_argument("--topology", default="v4-8", help="flops: the mmjax.aot target")
  parser.add_argument("--config", default="configs/shapes.py", help="time: the model")
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: flops 32, time the config's own)")
  parser.add_argument("--rounds", type=int, default=20, help="time: steps of each variant")
  parser.add_argument("--depth", type=int, default=None,
                      help="time: cut every stack to this many layers (CoCa configs)")
  args = parser.parse_args()
  if args.batch is None:
    args.batch = 32 if args.mode == "flops" else int(cli.load_config(args.config).batch_size)
  cpu, load = common.cpu_model(), os.getloadavg()
  print(f"CPU: {cpu}; load average at start {load[0]:.2f}", flush=True)
  start = time.perf_counter()
  result = flops_mode(args) if args.mode == "flops" else time_mode(args)
  print(json.dumps({"benchmark": "patch_dropout", "fraction": args.fraction, "cpu": cpu,
                    "load_average_start": [round(x, 2) for x in load],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "wall_s": round(time.perf_counter() - start, 1), "jax": jax.__version__,
                    **result}))


if __name__ == "__main__":
  main()
