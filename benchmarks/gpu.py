"""CoCa-Base training throughput and MFU on one accelerator: every GPU figure in one run.

  PYTHONPATH=. python benchmarks/gpu.py                  # H100/H200: <= ~5 minutes
  PYTHONPATH=. python benchmarks/gpu.py --reduced        # CPU smoke run of the same code
  PYTHONPATH=. python benchmarks/gpu.py --profile_dir /tmp/trace   # + a profiler trace

Variants: CoCa-Base (`configs/coca.py:base`: Table 1 sizes, bfloat16 compute, float32
parameters, the paper's Adafactor) at 224 px (patch 16, 196 image tokens) and 288 px
(patch 18, 256 tokens, the paper's pretraining setting), each with the scan / remat / batch
settings in VARIANTS below. Each variant runs the real train step (`step.jit_train_step`,
shardings, donated state) on one device. It is timed twice with the same compiled program:
on a device-resident random batch (the step itself), then copying the host batch to the
device every step as training does (`runtime.Runtime.global_batch`): their difference is the
host-to-device transfer the training loop's prefetch has to hide.

Per variant: compile seconds, median step time of `--steps` timed steps after `--warmup`,
examples/s, model TFLOP/s (`mmjax.summary` training FLOPs x examples/s) and MFU against the
device's dense bf16 peak (`topologies.peak_flops_per_device`: 989 TFLOP/s for H100 SXM / H200;
`--peak_tflops` overrides; CPUs have none, so MFU is null there). A variant that runs out
of memory is reported as such and the run goes on. When torch and open_clip import (their
wheels carried), open_clip's coca_ViT-B-32 step (bf16 autocast, as `--precision amp_bf16`)
and mmjax's same architecture are timed on the same device.

The last line is one JSON object with every figure.

On the lent H100/H200 machines (jax, flax, optax, orbax, torch preinstalled; nothing can be
downloaded there) mmjax's imports also need grain, tensorflow-datasets and what they import
(array_record, dm-tree, googleapis-common-protos, immutabledict, portpicker, promise,
simple-parsing, tensorflow-metadata, toml, docstring-parser), ml_collections, and
pycocoevalcap's bleu/cider modules (its wheel is 104 MB of Java; the Python modules are
enough). Unpack the cp312 wheels into an ignored folder, carry it (the device tool's
`carry`, 64 MiB in all) and put it first on PYTHONPATH:
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 PYTHONPATH=.gpu/site:. python benchmarks/gpu.py --isolate
open_clip 3.3.0 (+ ftfy, wcwidth) is small enough to carry too; torch is on the machine.
Figures and the exact commands: benchmarks/RESULTS.md, "GPU".
"""
import argparse
import json
import statistics
import subprocess
import sys
import traceback

import jax

import common  # benchmarks/common.py
from mmjax import cli, summary, topologies

# name -> (image_size, patch_size, per-device batch, model overrides). The first four run by
# default; the rest only when named in --variants (an unrolled CoCa-Base compiles for minutes).
VARIANTS = {
    "224_scan_noremat_b128": (224, 16, 128, dict(remat_policy="none")),
    "224_scan_dots_b256": (224, 16, 256, dict(remat_policy="dots_with_no_batch_dims")),
    "288_scan_noremat_b128": (288, 18, 128, dict(remat_policy="none")),
    "288_scan_dots_b256": (288, 18, 256, dict(remat_policy="dots_with_no_batch_dims")),
    "224_unrolled_noremat_b128": (224, 16, 128, dict(remat_policy="none", scan_layers=False)),
    "288_scan_full_b512": (288, 18, 512, dict(remat_policy="full")),
    # model.attention_impl="cudnn": cuDNN flash attention where its shapes allow (the ViT,
    # caption pooler and unimodal decoder at these sizes; mmjax.models.layers.cudnn_supports).
    "288_scan_noremat_b128_cudnn": (288, 18, 128, dict(remat_policy="none",
                                                       attention_impl="cudnn")),
    "288_scan_dots_b256_cudnn": (288, 18, 256, dict(remat_policy="dots_with_no_batch_dims",
                                                    attention_impl="cudnn")),
    "288_scan_noremat_b256_cudnn": (288, 18, 256, dict(remat_policy="none",
                                                       attention_impl="cudnn")),
    "288_scan_dots_b512_cudnn": (288, 18, 512, dict(remat_policy="dots_with_no_batch_dims",
                                                    attention_impl="cudnn")),
}
DEFAULT_VARIANTS = tuple(VARIANTS)[:4]
# --reduced: the same code on configs/coca.py:tiny, sized for a CPU test (bf16 on one).
REDUCED_VARIANTS = {
    "32_scan_noremat_b4": (32, 16, 4, dict(remat_policy="none")),
    "48_scan_dots_b4_bf16": (48, 16, 4, dict(remat_policy="dots_with_no_batch_dims",
                                             dtype="bfloat16")),
}


def variant_config(base: str, image_size: int, patch_size: int, batch: int, overrides: dict,
                   text_len: int | None):
  config = cli.load_config(base)
  config.unlock()
  config.batch_size = batch
  config.grad_accum_steps = 1
  config.mesh.shape = (1, 1, 1)
  config.data.image_size = image_size
  config.model.patch_size = patch_size
  if text_len:
    config.data.max_text_len = text_len
  config.model.update(overrides)
  config.lock()
  return config


def bench_variant(name, base, image_size, patch_size, batch, overrides, args, peak) -> dict:
  config = variant_config(base, image_size, patch_size, batch, overrides, args.text_len)
  flops_per_example = summary.model_flops_per_example(config)
  out = {"image_size": image_size, "patch_size": patch_size, "batch": batch, **overrides}
  try:
    run, compile_s = common.mmjax_runner(config)
    times = common.time_steps(run, args.warmup, args.steps, "device")
    host_times = common.time_steps(run, 1, args.steps, "host")
  except Exception as e:  # noqa: BLE001  (an OOM variant is a result, not the end)
    kind = "out_of_memory" if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower() \
        else type(e).__name__
    print(f"{name}: failed ({kind}): {str(e).splitlines()[0][:300]}", flush=True)
    if kind != "out_of_memory":
      traceback.print_exc()
    return {**out, "error": kind}
  out.update(memory_of(run.compiled))
  step_s, host_step_s = statistics.median(times), statistics.median(host_times)
  tflops = batch * flops_per_example / step_s / 1e12
  out.update(compile_s=round(compile_s, 2), step_s=round(step_s, 5),
             examples_per_s=round(batch / step_s, 2), model_tflops_per_s=round(tflops, 6),
             mfu=round(tflops * 1e12 / peak, 6) if peak else None,
             flops_per_example=flops_per_example, host_feed_step_s=round(host_step_s, 5))
  print(f"{name}: compile {compile_s:.1f} s, step {step_s * 1e3:.1f} ms "
        f"({host_step_s * 1e3:.1f} ms feeding from the host), "
        f"{batch / step_s:.1f} ex/s, {tflops:.1f} TFLOP/s"
        + (f", MFU {100 * tflops * 1e12 / peak:.1f}%" if peak else ""), flush=True)
  return out


def memory_of(compiled) -> dict:
  """The compiler's per-device figures (what `mmjax.aot` reports ahead of time: arguments +
  temporaries + outputs not aliased) and, where the backend keeps them, the allocator's
  measured peak of this process (so one variant per process: `--isolate`)."""
  m = compiled.memory_analysis()
  out = {}
  if m is not None:
    compiled_total = (m.argument_size_in_bytes + m.temp_size_in_bytes
                      + m.output_size_in_bytes - m.alias_size_in_bytes)
    out.update(compiled_temp_bytes=m.temp_size_in_bytes,
               compiled_argument_bytes=m.argument_size_in_bytes,
               compiled_total_bytes=compiled_total)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out.update(peak_bytes_in_use=stats["peak_bytes_in_use"], bytes_limit=stats.get("bytes_limit"))
  return out


def isolated(name: str, args) -> dict:
  """One variant in a fresh process of this script: its own allocator peak, and an
  out-of-memory or crash that cannot affect the next variant."""
  command = [sys.executable, __file__, "--variants", name, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--text_len", str(args.text_len),
             "--peak_tflops", str(args.peak_tflops), "--openclip_batch", "0"]
  command += ["--reduced"] if args.reduced else []
  proc = subprocess.run(command, capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()  # the child's progress, then its JSON line
  print("\n".join(lines[:-1]) if lines else proc.stderr[-2000:], flush=True)
  try:
    return json.loads(lines[-1])["variants"][name]
  except (IndexError, ValueError, KeyError):
    return {"error": f"process exited {proc.returncode}", "stderr_tail": proc.stderr[-1500:]}


def bench_openclip(batch: int, args) -> dict:
  """open_clip's coca_ViT-B-32 vs mmjax's on this device, bf16 autocast vs bf16 compute."""
  try:
    import open_clip  # noqa: F401
    import torch
  except ImportError as e:
    return {"skipped": f"open_clip/torch not importable here ({e})"}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  run_oc, _ = common.make_openclip_step(batch, seed=0, device=device,
                                        amp_bf16=device == "cuda")
  oc_times = common.time_steps(run_oc, args.warmup, args.steps)
  config = common.openclip_b32_config(
      batch, dtype="bfloat16" if device == "cuda" else "float32")
  run_mm, compile_s = common.mmjax_runner(config)
  mm_times = common.time_steps(run_mm, args.warmup, args.steps)
  oc, mm = statistics.median(oc_times), statistics.median(mm_times)
  print(f"coca_ViT-B-32 batch {batch} on {device}: open_clip {oc * 1e3:.1f} ms, "
        f"mmjax {mm * 1e3:.1f} ms ({oc / mm:.2f}x)", flush=True)
  return {"batch": batch, "torch": torch.__version__, "torch_device": device,
          "openclip_step_s": round(oc, 5), "mmjax_step_s": round(mm, 5),
          "mmjax_compile_s": round(compile_s, 2), "speedup_mmjax_vs_openclip": round(oc / mm, 3)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--reduced", action="store_true",
                      help="configs/coca.py:tiny at small sizes: checks the script on a CPU")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--variants", default="",
                      help=f"comma-separated names of {tuple(VARIANTS)}; default "
                           f"{DEFAULT_VARIANTS} (--reduced: all of {tuple(REDUCED_VARIANTS)})")
  parser.add_argument("--text_len", type=int, default=0, help="override data.max_text_len")
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  parser.add_argument("--openclip_batch", type=int, default=128, help="0 = skip open_clip")
  parser.add_argument("--profile_dir", default="", help="trace the first variant's steps")
  parser.add_argument("--isolate", action="store_true",
                      help="each variant in a fresh process (per-variant peak memory)")
  args = parser.parse_args()

  device = jax.devices()[0]
  peak = topologies.peak_flops_per_device(device.device_kind, args.peak_tflops)
  base = "configs/coca.py:tiny" if args.reduced else "configs/coca.py:base"
  table = REDUCED_VARIANTS if args.reduced else VARIANTS
  names = [v for v in args.variants.split(",") if v] or (
      list(REDUCED_VARIANTS) if args.reduced else list(DEFAULT_VARIANTS))
  unknown = set(names) - set(table)
  if unknown:
    raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {tuple(table)}")
  results = {"device": device.device_kind, "platform": device.platform,
             "jax": jax.__version__, "config": base, "peak_tflops": peak and peak / 1e12,
             "steps": args.steps, "variants": {}}
  print(f"{device.device_kind}: peak {peak and peak / 1e12} TFLOP/s (dense bf16)", flush=True)
  for name in names:
    results["variants"][name] = (isolated(name, args) if args.isolate else
                                 bench_variant(name, base, *table[name], args, peak))
  ok = {k: v for k, v in results["variants"].items() if "mfu" in v}
  if ok:
    best = max(ok, key=lambda k: ok[k]["model_tflops_per_s"])
    results["best"] = {"variant": best, "mfu": ok[best]["mfu"],
                       "model_tflops_per_s": ok[best]["model_tflops_per_s"]}
    if args.profile_dir:
      config = variant_config(base, *table[best], args.text_len)
      run, _ = common.mmjax_runner(config)
      run()
      with jax.profiler.trace(args.profile_dir):
        for _ in range(3):
          run()
      results["profile_dir"] = args.profile_dir
  if args.openclip_batch and not args.reduced:
    results["openclip_b32"] = bench_openclip(args.openclip_batch, args)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
