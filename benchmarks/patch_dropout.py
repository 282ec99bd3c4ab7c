"""What patch dropout (model.patch_dropout, FLIP) saves: CoCa's train-step FLOPs and CPU step
time with a fraction of the image tokens dropped, against none, in one run.

  PYTHONPATH=. nice -n 10 python benchmarks/patch_dropout.py [--config configs/coca.py:base] \
      [--fraction 0.5] [--flops_batch 8] [--depth 2] [--batch 4] [--steps 3] [--no_flops]

FLOPs: the whole train step (forward, backward, AdamW) of `--config` at `--flops_batch` on
one CPU device, from XLA's cost analysis of the lowered (not compiled) program
(`jax.stages.Lowered.cost_analysis`), divided by the batch: per example.
Step time: the same config with every stack cut to `--depth` layers (what a shared 2-core
CPU can run), batch `--batch`, the real jitted step (benchmarks/common.py), steps of the two
variants interleaved; medians of wall seconds. Prints the CPU model and the load average:
the machine is shared and wall times move with its load. The last line is one JSON object.
"""
import argparse
import json
import os
import statistics
import time

import jax

import common  # benchmarks/common.py
from mmjax import cli, runtime


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


def flops_per_example(spec: str, fraction: float, batch: int) -> float:
  rt = runtime.build(config_for(spec, fraction, batch), jax.devices()[:1])
  return rt.lower_train_step().cost_analysis()["flops"] / batch


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/coca.py:base")
  parser.add_argument("--fraction", type=float, default=0.5)
  parser.add_argument("--flops_batch", type=int, default=8)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no_flops", action="store_true", help="step times only")
  args = parser.parse_args()
  cpu, load = common.cpu_model(), os.getloadavg()
  print(f"CPU: {cpu}; load average at start {load[0]:.1f}", flush=True)
  fractions = (0.0, args.fraction)
  flops = {f: (float("nan") if args.no_flops else
               flops_per_example(args.config, f, args.flops_batch)) for f in fractions}
  for f in fractions:
    print(f"{args.config} patch_dropout={f}: {flops[f] / 1e9:.2f} GFLOP per example "
          f"(lowered cost analysis, batch {args.flops_batch})", flush=True)
  runners = {f: common.mmjax_runner(config_for(args.config, f, args.batch, args.depth))[0]
             for f in fractions}
  times = {f: [] for f in fractions}
  for f in fractions:
    runners[f]()  # warm-up
  for _ in range(args.steps):
    for f in fractions:
      start = time.perf_counter()
      runners[f]()
      times[f].append(time.perf_counter() - start)
  median = {f: statistics.median(t) for f, t in times.items()}
  for f in fractions:
    print(f"depth {args.depth}, batch {args.batch}, patch_dropout={f}: median step "
          f"{median[f]:.3f} s over {args.steps}", flush=True)
  print(json.dumps({
      "config": args.config, "fraction": args.fraction, "cpu": cpu,
      "load_average_start": round(load[0], 2), "load_average_end": round(os.getloadavg()[0], 2),
      "flops_per_example": {str(f): flops[f] for f in fractions},
      "flops_ratio": flops[args.fraction] / flops[0.0],
      "step_seconds_median": {str(f): median[f] for f in fractions},
      "step_time_ratio": median[args.fraction] / median[0.0],
      "depth": args.depth, "batch": args.batch, "steps": args.steps}))


if __name__ == "__main__":
  main()
