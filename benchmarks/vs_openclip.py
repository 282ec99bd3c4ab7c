"""One CoCa-B/32 training step in mmjax and in open_clip, timed side by side in one process.

  benchmarks/setup_openclip.sh      # once: the venv with torch + open_clip (+ jax)
  HF_HUB_OFFLINE=1 PYTHONPATH=.:benchmarks /work/venv-oc/bin/python benchmarks/vs_openclip.py \
      [--batch 8] [--steps 5] [--variants default,unrolled]

Architecture: `configs/openclip.py:coca_vit_b32` (mmjax) and open_clip's `coca_ViT-B-32`
(random init; the parity test checks these compute the same function). Same batch, 224 px,
float32, the same objective (contrastive + 2 x captioning, open_clip's `CoCaLoss`), AdamW
with global-norm clipping at 1.0 on both sides. mmjax runs its real train step
(`mmjax.step.train_step` from `mmjax.runtime`, jitted with shardings and donated state,
on a 1-device mesh);
open_clip runs eager PyTorch: zero_grad, forward, CoCaLoss, backward, clip, AdamW.step --
what open_clip's `train_one_epoch` does per step without autocast (CPU has no AMP).
Text: mmjax gets 77 tokens (it reads text[:, :-1]; 76 unimodal positions + CLS, 76
multimodal); open_clip gets its 76-token context (76 + CLS unimodal, 75 multimodal): mmjax
does at least as much work.

mmjax variants (`--variants`, each one jitted and warmed up before timing):
  default   the config as shipped (layers scanned with nn.scan, no remat)
  unrolled  model.scan_layers=False (XLA sees every layer; no scan loop overhead)
  remat     model.remat_policy=full (recomputes activations: the memory knob's cost)

Timing: every variant and open_clip take `--warmup` untimed steps, then the timed steps are
interleaved (mmjax variants, open_clip, mmjax variants, ...) so that load on the machine
hits all sides alike; the figure is the median. The last line is one JSON object.
"""
import argparse
import json
import statistics
import time

import jax

import common  # benchmarks/common.py

VARIANT_OVERRIDES = {
    "default": {},
    "unrolled": {"scan_layers": False},
    "remat": {"remat_policy": "full"},
}


def make_mmjax_step(variant: str, batch: int, seed: int):
  """(run one step -> loss, compile seconds): `common.mmjax_runner` on a CLIP-target batch."""
  config = common.openclip_b32_config(batch, **VARIANT_OVERRIDES[variant])
  return common.mmjax_runner(config, common.random_batch(config, seed, labels=False))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--variants", default="default,unrolled")
  parser.add_argument("--no_openclip", action="store_true", help="mmjax variants only")
  args = parser.parse_args()

  runners, results = {}, {"batch": args.batch, "image_size": 224, "dtype": "float32",
                          "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for variant in args.variants.split(","):
    runners[f"mmjax_{variant}"], compile_s = make_mmjax_step(variant, args.batch, seed=0)
    results[f"mmjax_{variant}_compile_s"] = round(compile_s, 2)
    print(f"mmjax {variant}: compiled in {compile_s:.1f} s", flush=True)
  if not args.no_openclip:
    runners["openclip"], torch = common.make_openclip_step(args.batch, seed=0)
    results.update(torch=torch.__version__, torch_threads=torch.get_num_threads())

  for name, run in runners.items():
    for _ in range(args.warmup):
      run()
  times = {name: [] for name in runners}
  for i in range(args.steps):
    for name, run in runners.items():
      start = time.perf_counter()
      loss = run()
      times[name].append(time.perf_counter() - start)
      print(f"step {i} {name}: {times[name][-1]:.3f} s  loss {loss:.4f}", flush=True)

  print(f"\nCoCa-B/32 train step, batch {args.batch}, 224 px, float32, median of {args.steps}:")
  for name, t in times.items():
    median = statistics.median(t)
    results[f"{name}_step_s"] = round(median, 4)
    results[f"{name}_examples_per_s"] = round(args.batch / median, 3)
    print(f"  {name:20s} {median:8.3f} s/step  {args.batch / median:7.2f} examples/s")
  if "openclip" in times:
    for name in runners:
      if name != "openclip":
        ratio = results["openclip_step_s"] / results[f"{name}_step_s"]
        results[f"speedup_{name}_vs_openclip"] = round(ratio, 3)
        print(f"  {name} is {ratio:.2f}x open_clip's speed")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
