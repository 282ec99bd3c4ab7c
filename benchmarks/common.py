"""What the benchmark scripts share: random batches, step timing, and the one-device train
step runners of mmjax and open_clip (imported by gpu.py and vs_openclip.py; neither imports
the other)."""
import contextlib
import subprocess
import time
from typing import Any, Callable

import jax
import numpy as np

from configs import openclip as openclip_configs
from mmjax import runtime
from mmjax.convert import openclip as convert


def cpu_model() -> str:
  """"<lscpu model name>, <n> CPUs, avx512f=<bool>, avx2=<bool>" (what CPU timings need)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    return (f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, "
            f"avx512f={'avx512f' in flags.split()}, avx2={'avx2' in flags.split()}")
  except OSError:
    return "unknown"


def random_batch(config, seed: int = 0, labels: bool = True) -> dict[str, np.ndarray]:
  """A batch of `runtime.batch_spec(config)`: uniform uint8 pixels, random tokens, half of
  the rows labelled (labels=False: CLIP targets, every row its own class), paired examples."""
  rng = np.random.default_rng(seed)
  spec = runtime.batch_spec(config)
  b = config.batch_size
  out = {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
  out["image"] = rng.integers(0, 256, spec["image"].shape, dtype=np.uint8)
  out["text"] = rng.integers(3, config.model.text.vocab_size, spec["text"].shape,
                             dtype=np.int32)
  out["label"] = (np.where(rng.random(b) < 0.5, rng.integers(0, 1000, b), -1) if labels
                  else np.full(b, -1)).astype(np.int32)
  for flag in ("has_image", "has_text", "paired"):
    out[flag] = np.ones(b, np.int32)
  return out


def time_steps(run: Callable, warmup: int, steps: int, *args) -> list[float]:
  for _ in range(warmup):
    run(*args)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run(*args)
    times.append(time.perf_counter() - start)
  return times


def mmjax_runner(config, host_batch: dict[str, np.ndarray] | None = None):
  """(run(feed) -> the loss of one step, waited for; compile seconds): the real jitted train
  step of `config` on one device, its state carried between calls. feed: "device" reuses a
  device-resident batch, "host" copies `host_batch` (default `random_batch`) every step."""
  rt = runtime.build(config, jax.devices()[:1])
  host_batch = random_batch(config) if host_batch is None else host_batch
  with rt.activate():
    state = rt.init_state()
    train_step = rt.jit_train_step()
    device_batch = rt.global_batch(host_batch)
    start = time.perf_counter()
    compiled = train_step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run(feed: str = "device") -> float:
    batch = rt.global_batch(host_batch) if feed == "host" else device_batch
    holder["state"], metrics = compiled(holder["state"], batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    if not np.isfinite(loss):
      raise FloatingPointError(f"non-finite loss {loss}")
    return loss

  run.compiled = compiled  # for callers that inspect the program (benchmarks/scan_overhead.py)
  return run, compile_s


def openclip_b32_config(batch: int, **model_overrides: Any):
  """configs/openclip.py:coca_vit_b32 on one device at `batch`."""
  config = openclip_configs.get_config("coca_vit_b32")
  with config.unlocked():
    config.batch_size = batch
    config.mesh.shape = (1, 1, 1)
    config.model.update(model_overrides)
  return config


def make_openclip_step(batch: int, seed: int, device: str = "cpu", amp_bf16: bool = False):
  """(run one open_clip training step and wait for it -> loss, the torch module).
  amp_bf16: torch.autocast in bfloat16, open_clip's `--precision amp_bf16`."""
  import torch  # optional: only where open_clip is installed
  from open_clip.loss import CoCaLoss
  model = convert.openclip_coca("coca_vit_b32", seed).to(device).train()
  loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999),
                                weight_decay=0.1)
  size = openclip_configs.get_config("coca_vit_b32").data.image_size
  rng = np.random.default_rng(seed)
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
