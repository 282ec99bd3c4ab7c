"""Caption generation with the same CoCa-B/32 weights in mmjax and open_clip, side by side.

  benchmarks/setup_openclip.sh && /work/venv-oc/bin/pip install 'transformers<4.50'
  HF_HUB_OFFLINE=1 PYTHONPATH=. /work/venv-oc/bin/python benchmarks/decode_vs_openclip.py \
      [--batch 4] [--new_tokens 32] [--repeats 3]

Weights: a random-init open_clip `coca_ViT-B-32` (every parameter perturbed, as in the
parity test, so no output is degenerate), converted with `mmjax.convert.openclip`; mmjax
runs `configs/openclip.py:coca_vit_b32` with open_clip's BPE ids (BOS 49406, EOS 49407).
Modes, both sides from the same images:
  top-k   sampling, k = --top_k, temperature 1 (open_clip `generate(generation_type="top_k")`,
          mmjax `DecodeConfig(strategy="sample")`)
  beam    beam search with --beams beams, length penalty 1 (open_clip `generate(
          generation_type="beam_search", num_beam_groups=1)`, i.e. plain beam search through
          Hugging Face's BeamSearchScorer; mmjax `DecodeConfig(strategy="beam")`)
Each side generates --new_tokens tokens per image (open_clip: seq_len = new_tokens + 1 with
its start token; it forces the last one to EOS). tokens/s counts the tokens each side
actually produced before EOS/padding, so an early stop is not counted as speed. mmjax's
decoder is jitted once and warmed up; open_clip runs one untimed call too. Timed calls
interleave the two sides; the figure is the median of --repeats.

Parity: greedy decoding (open_clip top_k=1) must give the same tokens on both sides up to
the token open_clip forces to EOS: the converted weights decode to the same captions.

open_clip 3.3.0's `generate` needs `transformers<4.50` (later releases removed
`BeamSearchScorer`). The last line is one JSON object with every figure.
"""
import argparse
import json
import statistics
import time

import jax
import numpy as np

from configs import openclip as openclip_configs
from mmjax import decode, models
from mmjax.convert import openclip as convert

VARIANT = "coca_vit_b32"
SOT, EOT, PAD = 49406, 49407, 0


def build_pair(seed: int = 0):
  """(torch model in eval mode, mmjax model, mmjax params) with the same weights."""
  # Random weights with every parameter perturbed: open_clip leaves the caption head
  # uninitialised, and non-degenerate logits make the greedy parity check meaningful.
  torch_model = convert.openclip_coca(VARIANT, seed, perturb=True).eval()
  config = openclip_configs.get_config(VARIANT)
  params = convert.convert_state_dict(
      {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, config)
  convert.check_params(params, config)
  return torch_model, models.build_model(config), jax.device_put(params), config


def count_generated(tokens: np.ndarray) -> int:
  """Tokens produced per row up to and including EOS (PAD after it is not a token)."""
  total = 0
  for row in tokens:
    eos = np.flatnonzero(row == EOT)
    total += int(eos[0]) + 1 if len(eos) else int((row != PAD).sum())
  return total


def timed(fn) -> tuple[float, np.ndarray]:
  start = time.perf_counter()
  out = np.asarray(fn())
  return time.perf_counter() - start, out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--top_k", type=int, default=50)
  parser.add_argument("--beams", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--modes", default="top_k,beam")
  args = parser.parse_args()
  import open_clip
  import torch
  import transformers

  torch_model, model, params, config = build_pair()
  size = config.data.image_size
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, 3)).astype(
      np.float32)
  # mmjax takes floating-point images as already in [-1, 1] (the pipeline's uint8 pixels
  # would be mapped there first) and applies CLIP's normalisation inside
  # (model.image_norm="clip"); open_clip takes them normalised.
  mean = np.asarray(open_clip.OPENAI_DATASET_MEAN, np.float32).reshape(1, 3, 1, 1)
  std = np.asarray(open_clip.OPENAI_DATASET_STD, np.float32).reshape(1, 3, 1, 1)
  torch_images = torch.from_numpy(((images.transpose(0, 3, 1, 2) + 1) / 2 - mean) / std)
  ids = dict(bos_id=SOT, eos_id=EOT, pad_id=PAD, max_new_tokens=args.new_tokens)
  mmjax_configs = {
      "greedy": decode.DecodeConfig(strategy="greedy", **ids),
      "top_k": decode.DecodeConfig(strategy="sample", top_k=args.top_k, **ids),
      "beam": decode.DecodeConfig(strategy="beam", beam_size=args.beams, length_penalty=1.0,
                                  **ids),
  }
  openclip_kwargs = {
      "greedy": dict(generation_type="top_k", top_k=1),
      "top_k": dict(generation_type="top_k", top_k=args.top_k),
      "beam": dict(generation_type="beam_search", num_beams=args.beams, num_beam_groups=1),
  }

  def run_openclip(mode: str) -> np.ndarray:
    with torch.no_grad():
      out = torch_model.generate(torch_images, seq_len=args.new_tokens + 1,
                                 **openclip_kwargs[mode])
    return out[:, 1:].numpy()  # drop the start token

  results = {"batch": args.batch, "new_tokens": args.new_tokens, "top_k": args.top_k,
             "beams": args.beams, "device": jax.devices()[0].device_kind,
             "jax": jax.__version__, "torch": torch.__version__,
             "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
  rng = jax.random.key(0)

  # Parity: greedy tokens agree up to open_clip's forced final EOS.
  greedy = decode.make_captioner(model, mmjax_configs["greedy"])
  mm_greedy = np.asarray(greedy(params, images, rng))
  oc_greedy = run_openclip("greedy")
  n = min(mm_greedy.shape[1], oc_greedy.shape[1]) - 1
  results["greedy_tokens_equal"] = bool(np.array_equal(mm_greedy[:, :n], oc_greedy[:, :n]))
  print(f"greedy parity over {n} tokens x {args.batch} images: "
        f"{'equal' if results['greedy_tokens_equal'] else 'DIFFERENT'}", flush=True)

  for mode in args.modes.split(","):
    captioner = decode.make_captioner(model, mmjax_configs[mode])
    start = time.perf_counter()
    np.asarray(captioner(params, images, rng))  # compile + first run
    results[f"{mode}_mmjax_first_call_s"] = round(time.perf_counter() - start, 2)
    run_openclip(mode)  # warm-up
    times = {"mmjax": [], "openclip": []}
    counts = {}
    for r in range(args.repeats):
      t, out = timed(lambda: captioner(params, images, jax.random.fold_in(rng, r)))
      times["mmjax"].append(t)
      counts["mmjax"] = count_generated(out)
      t, out = timed(lambda: run_openclip(mode))
      times["openclip"].append(t)
      counts["openclip"] = count_generated(out)
    for side in times:
      median = statistics.median(times[side])
      results[f"{mode}_{side}_s"] = round(median, 4)
      results[f"{mode}_{side}_tokens"] = counts[side]
      results[f"{mode}_{side}_tokens_per_s"] = round(counts[side] / median, 2)
    speedup = results[f"{mode}_mmjax_tokens_per_s"] / results[f"{mode}_openclip_tokens_per_s"]
    results[f"{mode}_speedup"] = round(speedup, 2)
    print(f"{mode}: mmjax {results[f'{mode}_mmjax_tokens_per_s']:.1f} tok/s, open_clip "
          f"{results[f'{mode}_openclip_tokens_per_s']:.1f} tok/s -> {speedup:.1f}x "
          f"(tokens {counts['mmjax']} / {counts['openclip']})", flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
