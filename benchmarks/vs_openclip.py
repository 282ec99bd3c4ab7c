"""One CoCa-B/32 training step in mmjax and in open_clip, timed side by side in one process.

  benchmarks/setup_openclip.sh      # once: the venv with torch + open_clip (+ jax)
  HF_HUB_OFFLINE=1 PYTHONPATH=. /work/venv-oc/bin/python benchmarks/vs_openclip.py \
      [--batch 8] [--steps 5] [--variants default,unrolled]

Architecture: `configs/openclip.py:coca_vit_b32` (mmjax) and open_clip's `coca_ViT-B-32`
(random init; the parity test checks these compute the same function). Same batch, 224 px,
float32, the same objective (contrastive + 2 x captioning, open_clip's `CoCaLoss`), AdamW
with global-norm clipping at 1.0 on both sides. mmjax runs its real train step
(`step.StepFns.train_step`, jitted with shardings and donated state, on a 1-device mesh);
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
import os
import statistics
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu  # noqa: E402  (benchmarks/gpu.py: the one-device train-step runner)
import openclip as openclip_configs  # noqa: E402  (configs/openclip.py)

from mmjax.convert import openclip as convert  # noqa: E402

VARIANT_OVERRIDES = {
    "default": {},
    "unrolled": {"scan_layers": False},
    "remat": {"remat_policy": "full"},
}


def mmjax_config(variant: str, batch: int):
  config = openclip_configs.get_config("coca_vit_b32")
  config.unlock()
  config.batch_size = batch
  config.mesh.shape = (1, 1, 1)
  config.model.update(VARIANT_OVERRIDES[variant])
  config.lock()
  return config


def make_mmjax_step(variant: str, batch: int, seed: int):
  """(run one step -> loss, compile seconds): `gpu.mmjax_runner` on a CLIP-target batch."""
  config = mmjax_config(variant, batch)
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.data.max_text_len
  host_batch = dict(
      image=rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
      text=rng.integers(3, 49407, (batch, length)).astype(np.int32),
      label=np.full((batch,), -1, np.int32),  # CLIP targets, as open_clip
      text_type=np.zeros((batch,), np.int32),
      source=np.zeros((batch,), np.int32), skipped=np.zeros((batch,), np.int32))
  return gpu.mmjax_runner(config, host_batch)


def make_openclip_step(batch: int, seed: int, device: str = "cpu", amp_bf16: bool = False):
  """() -> runs one open_clip training step and waits for it. amp_bf16: torch.autocast in
  bfloat16, open_clip's `--precision amp_bf16` (GPU runs in benchmarks/gpu.py)."""
  import contextlib

  import torch
  from open_clip.loss import CoCaLoss
  model = convert.openclip_coca("coca_vit_b32", seed).to(device).train()
  loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999),
                                weight_decay=0.1)
  config = openclip_configs.get_config("coca_vit_b32")
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  images = torch.from_numpy(rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))
  text = torch.from_numpy(rng.integers(3, 49407, (batch, model.context_length)))
  images, text = images.to(device), text.to(device)
  autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp_bf16 else \
      contextlib.nullcontext

  def run() -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      out = model(images, text)
      clip_loss, caption_loss = loss_fn(out["image_features"], out["text_features"],
                                        out["logits"], out["labels"], out["logit_scale"])
      total = clip_loss + caption_loss  # CoCaLoss has applied the weights
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(total.detach())

  return run, torch


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
    runners["openclip"], torch = make_openclip_step(args.batch, seed=0)
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
