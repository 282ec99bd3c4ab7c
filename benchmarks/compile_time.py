"""Lower + compile time of the CoCa train step, layers scanned (nn.scan) vs unrolled.

  PYTHONPATH=. python benchmarks/compile_time.py [--config configs/coca.py:large]
      [--batch 8] [--variants scanned,unrolled]

Each variant is the real train step (`mmjax.runtime`: forward, backward, optimizer,
shardings, donation) of the config with only `model.scan_layers` changed, lowered and
compiled from abstract shapes (`jax.eval_shape` state: no parameter memory, so CoCa-Large's
~800M parameters cost nothing here). Every variant runs in a fresh subprocess with the
persistent compilation cache off, so nothing is reused between them. Reports lowering
seconds, compile seconds, the compiled program's temporary memory and the size of the
lowered StableHLO text. The last line is one JSON object with all figures.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"scanned": True, "unrolled": False}


def measure(config_spec: str, batch: int, scan_layers: bool) -> dict:
  """Lowers and compiles the train step in this process; returns its figures."""
  import jax  # in the child only: the parent must not initialise a backend
  import numpy as np
  from mmjax import cli, runtime

  jax.config.update("jax_enable_compilation_cache", False)
  config = cli.load_config(config_spec)
  config.unlock()
  config.batch_size = batch
  config.mesh.shape = (1, 1, 1)
  config.model.scan_layers = scan_layers
  config.lock()
  rt = runtime.build(config, jax.devices()[:1])
  with rt.activate():
    train_step = rt.jit_train_step()
    start = time.perf_counter()
    lowered = train_step.lower(rt.abstract_state, rt.abstract_batch())
    lower_s = time.perf_counter() - start
    hlo_chars = len(lowered.as_text())
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rt.abstract_state.params))
  return {"lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
          "total_s": round(lower_s + compile_s, 2), "stablehlo_chars": hlo_chars,
          "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
          "params": params}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/coca.py:large")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--variants", default="scanned,unrolled")
  parser.add_argument("--_child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:
    print(json.dumps(measure(args.config, args.batch, VARIANTS[args._child])))
    return

  results = {"config": args.config, "batch": args.batch}
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      raise SystemExit(f"--variants: unknown {variant!r}; choose from {tuple(VARIANTS)}")
    print(f"{variant}: lowering and compiling {args.config} train step ...", flush=True)
    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--batch",
                          str(args.batch), "--_child", variant], env=env, check=True,
                         capture_output=True, text=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  lower {figures['lower_s']:.1f} s, compile {figures['compile_s']:.1f} s, "
          f"temp memory {figures['temp_mib']} MiB, StableHLO {figures['stablehlo_chars']:,} "
          f"chars ({figures['params'] / 1e6:.1f}M params)", flush=True)
    results.update({f"{variant}_{k}": v for k, v in figures.items() if k != "params"})
    results["params"] = figures["params"]
  if {"scanned", "unrolled"} <= set(args.variants.split(",")):
    results["unrolled_over_scanned_total"] = round(
        results["unrolled_total_s"] / results["scanned_total_s"], 2)
  import jax
  results.update(device="cpu", jax=jax.__version__)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
