"""Parameter counts per part and training FLOPs per example of a CoCa config.

  python -m mmjax.summary --config configs/coca.py:giant [--json] [--config.KEY=VALUE ...]

Parameters are counted on `jax.eval_shape(model.init, ...)`: shapes only, no memory, no
compile (giant in ~2 s). Parts, by the model's top-level modules:
  image encoder  `vision` (patch embedding, positions, blocks, final norm)
  poolers        `caption_pooler` + `contrastive_pooler` (queries, norms, attention)
  text decoder   `token_embed` + `unimodal` + `multimodal` + `lm_head` (the paper's decoder)
  other          `image_proj`, `text_proj`, `logit_scale` and any module not listed above
The paper's Table 1 "total" equals image encoder + decoder (86M + 297M = 383M), so poolers
and projections are outside it; `params_table1` reports that sum next to `params_total`.

Training FLOPs per example (model FLOPs, the MFU convention)
-------------------------------------------------------------
Only matrix multiplications are counted; a multiply-add is 2 FLOPs. Norms, GELU, softmax,
residual adds, the cross-entropy and the optimizer update are left out (they are O(tokens x
width), against O(tokens x width^2) for the matmuls). A forward matmul of an [n, k] input
with a [k, m] weight costs 2nkm; the backward pass costs twice that (dX = dY W^T and
dW = X^T dY), so training = 3 x forward. The one exception is the patch embedding: nothing
needs the gradient of the images, so it costs forward + dW = 2 x forward. Rematerialisation
(`model.remat_policy`), the recomputed logits of the sharded contrastive loss and the extra
embedding pass of gradient accumulation are real work but not counted (as for MFU).

Notation: N = (image_size / patch)^2 image tokens, p patch, L = data.max_text_len,
P = model.prefix_length, Q = num_caption_queries, V vocab, E embed_dim, B global batch;
Dv, Fv, Lv vision width / MLP / layers; Dt, Ft text width / MLP; Lu, Lm unimodal /
multimodal layers. Positions: unimodal Tu = P + (L - 1) + 1 (prefix, input tokens, CLS),
multimodal Tm = P + L - 1 (CLS dropped), predicted tokens Tc = L - 1.
An attention layer with T queries over S keys of width D costs 4*T*S*D forward
(QK^T: 2TSD, probabilities x V: 2TSD), plus its projections. Causal attention is counted in
full (T*T, not T*(T+1)/2): the dense XLA kernel computes the masked half too.

Forward FLOPs per example:
  patch embedding   2*N*(p*p*3*Dv)
  ViT               Lv * [2*N*(4*Dv^2 + 2*Dv*Fv) + 4*N^2*Dv]
  caption pooler    2*Q*Dt^2 (q) + 2*2*N*Dv*Dt (k, v) + 2*Q*Dt^2 (out) + 4*Q*N*Dt
  contrastive pool. cascade: 2*Dt^2 + 2*2*Q*Dt^2 + 2*Dt^2 + 4*Q*Dt   (1 query over Q tokens)
                    parallel: 2*Dt^2 + 2*2*N*Dv*Dt + 2*Dt^2 + 4*N*Dt
  unimodal          Lu * [2*Tu*(4*Dt^2 + 2*Dt*Ft) + 4*Tu^2*Dt]
  multimodal        Lm * [2*Tm*(4*Dt^2 + 2*Dt*Ft) + 4*Tm^2*Dt
                          + 2*2*Tm*Dt^2 (cross q, out) + 2*2*Q*Dt^2 (cross k, v) + 4*Tm*Q*Dt]
  lm head           2*Tc*Dt*V (tied or untied)
  projections       2*Dt*E (image) + 2*Dt*E (text)
  contrastive loss  2*B*E (this example's share of the B x B logits)
Training FLOPs per example = 3 x (sum of the above) - 1 x (patch embedding).
Note the multimodal cross-attention k/v projections run over Q = 256 tokens per layer, more
than the text itself, so "6 x params x text tokens" underestimates the decoder.
`tests/test_summary.py` checks the total against XLA's cost analysis of the jitted
forward+backward of the real loss.
"""
import json
import math
import sys
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mmjax import models, state as state_lib
from mmjax.models.coca import CoCaConfig

PARTS = {
    "image_encoder": ("vision",),
    "poolers": ("caption_pooler", "contrastive_pooler"),
    "text_decoder": ("token_embed", "unimodal", "multimodal", "lm_head"),
}


def count_params(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameters per top-level module of the model, from shapes only (no memory, no compile)."""
  model = models.build_model(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *state_lib.dummy_inputs(config))
  params = nn.unbox(abstract["params"])
  return {name: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
          for name, tree in params.items()}


FLAVA_PARTS = {
    "image_encoder": ("vision",),
    "text_encoder": ("token_embed", "text"),
    "multimodal_encoder": ("image_to_mm", "text_to_mm", "mm_cls", "multimodal", "mm_ln"),
    "heads": ("mlm_head", "mim_head", "mmm_text_head", "mmm_image_head", "itm_head"),
}


def flava_forward_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Forward matmul FLOPs per example of FLAVA's pretraining forward (`Flava.pretrain`),
  per part; same conventions as `forward_flops` (matmuls only, causal-free dense attention).

  Every example runs the image encoder twice (clean for the contrastive loss, masked for
  MIM / MMM) and the text encoder twice (clean, masked), whatever its modality: the batch
  is dense, flags only weight the losses. With T_i = 1 + N image tokens (CLS), L text
  tokens, T_m = 1 + T_i + L multimodal tokens (its CLS first), and a head
  x -> Dense(D) -> Dense(out) costing 2*T*D^2 + 2*T*D*out:
    patch embedding     2 x 2*N*(p*p*3*Dv)
    image encoder       2 x Lv * [2*T_i*(4*Dv^2 + 2*Dv*Fv) + 4*T_i^2*Dv]
    text encoder        2 x Lt * [2*L*(4*Dt^2 + 2*Dt*Ft) + 4*L^2*Dt]
    multimodal encoder  2*T_i*Dv*Dm + 2*L*Dt*Dm (input projections)
                        + Lm * [2*T_m*(4*Dm^2 + 2*Dm*Fm) + 4*T_m^2*Dm]
    heads               MLM (L, Dt, V) + MIM (N, Dv, M) + MMM text (L, Dm, V)
                        + MMM image (N, Dm, M) + ITM (1, Dm, 1); M = p*p*3 or codebook size,
                        V = FlavaConfig.padded_vocab (vocab + [MASK], rounded up to 128)
    projections         2*Dv*E + 2*Dt*E
    contrastive loss    2*B*E (this example's share of the dense B x B logits)
  MIM targets (normalised pixels, nearest codebook centroid) are target preprocessing
  without gradients and are not counted. Training = 3 x forward, patch embedding 2 x.
  """
  from mmjax.models.flava import FlavaConfig
  c = FlavaConfig.from_config(config)
  n, p, length = c.num_patches, c.patch_size, c.max_text_len
  dv, dt, dm = c.vision_width, c.text_width, c.mm_width
  ti, tm = 1 + n, 2 + n + length
  block = lambda t, d, f: 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
  head = lambda t, d, out: 2 * t * d * d + 2 * t * d * out
  v, m = c.padded_vocab, c.mim_outputs  # the text heads compute the padded logits
  return {
      "patch_embedding": 2 * 2 * n * p * p * 3 * dv,
      "image_encoder": 2 * c.vision_depth * block(ti, dv, c.vision_mlp_dim),
      "text_encoder": 2 * c.text_depth * block(length, dt, c.text_mlp_dim),
      "multimodal_encoder": (2 * ti * dv * dm + 2 * length * dt * dm
                             + c.mm_depth * block(tm, dm, c.mm_mlp_dim)),
      "heads": (head(length, dt, v) + head(n, dv, m) + head(length, dm, v) + head(n, dm, m)
                + head(1, dm, 1)),
      "projections": 2 * (dv + dt) * c.embed_dim,
      "contrastive_loss": 2 * config.batch_size * c.embed_dim,
  }


def summarize_flava(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """FLAVA parameter counts per part and training FLOPs per example.

  Keys: variant, params_total, params_<part> for FLAVA_PARTS and `other` (contrastive
  projections, logit scale), params_by_module, flops_per_example (training, model FLOPs,
  see `flava_forward_flops`), flops_per_step (x batch_size), flops_by_part (training).
  """
  by_module = count_params(config)
  out = {"variant": config.get("variant", config.get("preset", "")),
         "params_total": sum(by_module.values())}
  known = {m for modules in FLAVA_PARTS.values() for m in modules}
  for part, modules in FLAVA_PARTS.items():
    out[f"params_{part}"] = sum(by_module.get(m, 0) for m in modules)
  out["params_other"] = sum(v for k, v in by_module.items() if k not in known)
  out["params_by_module"] = by_module
  flops = train_flops(flava_forward_flops(config))
  out["flops_per_example"] = sum(flops.values())
  out["flops_per_step"] = out["flops_per_example"] * config.batch_size
  out["flops_by_part"] = flops
  return out


def format_flava_table(s: dict[str, Any]) -> str:
  total = s["params_total"]
  lines = [f"FLAVA {s['variant']}", "", f"{'parameters':40s} {'count':>14s} {'M':>9s} {'share':>7s}"]
  for name in (*FLAVA_PARTS, "other"):
    n = s[f"params_{name}"]
    lines.append(f"{name:40s} {n:14,d} {n / 1e6:9.2f} {100 * n / total:6.1f}%")
  lines.append(f"{'total':40s} {total:14,d} {total / 1e6:9.2f}")
  return "\n".join(lines + flops_lines(s))


def forward_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Forward matmul FLOPs per example, per part (formulas in the module docstring)."""
  c = CoCaConfig.from_config(config)
  n = (c.image_size // c.patch_size) ** 2
  dv, fv, dt, ft, q = c.vision_width, c.vision_mlp_dim, c.text_width, c.text_mlp_dim, \
      c.num_caption_queries
  tu = c.prefix_length + (c.max_text_len - 1) + 1
  tm = c.prefix_length + c.max_text_len - 1
  tc = c.max_text_len - 1
  attention = lambda t, s, d: 4 * t * s * d
  block = lambda t, d, f: 2 * t * (4 * d * d + 2 * d * f) + attention(t, t, d)
  if c.pooler == "cascade":
    contrastive_pooler = 2 * dt * dt + 2 * 2 * q * dt * dt + 2 * dt * dt + attention(1, q, dt)
  else:
    contrastive_pooler = 2 * dt * dt + 2 * 2 * n * dv * dt + 2 * dt * dt + attention(1, n, dt)
  cross = 2 * 2 * tm * dt * dt + 2 * 2 * q * dt * dt + attention(tm, q, dt)
  return {
      "patch_embedding": 2 * n * c.patch_size ** 2 * 3 * dv,
      "vision_blocks": c.vision_depth * block(n, dv, fv),
      "caption_pooler": 2 * q * dt * dt + 2 * 2 * n * dv * dt + 2 * q * dt * dt
                        + attention(q, n, dt),
      "contrastive_pooler": contrastive_pooler,
      "unimodal": c.num_uni_layers * block(tu, dt, ft),
      "multimodal": c.num_multi_layers * (block(tm, dt, ft) + cross),
      "lm_head": 2 * tc * dt * c.vocab_size,
      "projections": 2 * 2 * dt * c.embed_dim,
      "contrastive_loss": 2 * config.batch_size * c.embed_dim,
  }


# Dense bfloat16 peak FLOP/s per JAX device, the MFU denominator (vendor spec sheets). Matched
# in order against the lower-cased `device_kind`; the first hit wins.
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),  # one megacore chip
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p chip
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Dense bf16 peak FLOP/s of one device: `override_tflops` x 1e12 when > 0, else looked up
  by `device_kind` (e.g. "NVIDIA H100 80GB HBM3"); None when unknown (CPUs)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_FLOPS_BY_DEVICE_KIND if name in kind), None)


def model_flops_per_example(config: ml_collections.ConfigDict) -> int | None:
  """Training model FLOPs per example (`summarize` / `summarize_flava`'s total), or None for
  models without a formula."""
  formulas = {"coca": forward_flops, "flava": flava_forward_flops}
  formula = formulas.get(config.model.get("name", "coca"))
  return None if formula is None else sum(train_flops(formula(config)).values())


def train_flops(forward: dict[str, int]) -> dict[str, int]:
  """3 x forward (forward, dX, dW), except the patch embedding: no image gradient."""
  return {k: (2 if k == "patch_embedding" else 3) * v for k, v in forward.items()}


def summarize(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Parameter counts and training FLOPs per example of `config` (JSON-serialisable).

  Keys: params_total, params_image_encoder, params_poolers, params_text_decoder,
  params_other, params_table1 (image encoder + text decoder, the paper's definition),
  params_by_module, flops_per_example (training, model FLOPs), flops_per_step
  (x batch_size), flops_by_part (training), tokens.
  """
  by_module = count_params(config)
  grouped = {part: sum(by_module.get(m, 0) for m in modules)
             for part, modules in PARTS.items()}
  known = {m for modules in PARTS.values() for m in modules}
  grouped["other"] = sum(v for k, v in by_module.items() if k not in known)
  flops = train_flops(forward_flops(config))
  per_example = sum(flops.values())
  c = CoCaConfig.from_config(config)
  return {
      "variant": config.get("variant", config.get("preset", "")),
      "params_total": sum(by_module.values()),
      "params_image_encoder": grouped["image_encoder"],
      "params_poolers": grouped["poolers"],
      "params_text_decoder": grouped["text_decoder"],
      "params_other": grouped["other"],
      "params_table1": grouped["image_encoder"] + grouped["text_decoder"],
      "params_by_module": by_module,
      "flops_per_example": per_example,
      "flops_per_step": per_example * config.batch_size,
      "flops_by_part": flops,
      "tokens": {"image": (c.image_size // c.patch_size) ** 2,
                 "unimodal": c.prefix_length + c.max_text_len,
                 "multimodal": c.prefix_length + c.max_text_len - 1,
                 "caption_queries": c.num_caption_queries, "vocab": c.vocab_size},
  }


def format_table(s: dict[str, Any]) -> str:
  """Human-readable table of `summarize`'s output."""
  m = s["params_by_module"]
  total = s["params_total"]
  rows = [("image encoder (vision)", s["params_image_encoder"]),
          ("poolers (caption + contrastive)", s["params_poolers"]),
          ("text decoder", s["params_text_decoder"]),
          *[(f"  {k}", m.get(k, 0)) for k in PARTS["text_decoder"]],
          ("projections + logit scale", s["params_other"]),
          ("total", total),
          ("paper Table 1 sum (encoder + decoder)", s["params_table1"])]
  t = s["tokens"]
  lines = [f"CoCa {s['variant']}: {t['image']} image tokens, {t['unimodal']} unimodal / "
           f"{t['multimodal']} multimodal text positions, {t['caption_queries']} caption "
           f"queries, vocab {t['vocab']}", "",
           f"{'parameters':40s} {'count':>14s} {'M':>9s} {'share':>7s}"]
  for name, n in rows:
    lines.append(f"{name:40s} {n:14,d} {n / 1e6:9.2f} {100 * n / total:6.1f}%")
  return "\n".join(lines + flops_lines(s))


def flops_lines(s: dict[str, Any]) -> list[str]:
  """The training-FLOPs rows of `format_table` / `format_flava_table`."""
  lines = ["", f"{'training FLOPs per example':40s} {'GFLOP':>14s} {'share':>7s}"]
  for name, f in s["flops_by_part"].items():
    lines.append(f"{name:40s} {f / 1e9:14.2f} {100 * f / s['flops_per_example']:6.1f}%")
  lines.append(f"{'total':40s} {s['flops_per_example'] / 1e9:14.2f}")
  lines.append(f"{'per step (x batch)':40s} {s['flops_per_step'] / 1e9:14.4g}")
  return lines


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  is_flava = flags.FLAGS.config.model.name == "flava"
  summary = (summarize_flava if is_flava else summarize)(flags.FLAGS.config)
  if flags.FLAGS.json:
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
  else:
    print((format_flava_table if is_flava else format_table)(summary))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  # Its own flags (no --workdir, unlike mmjax.cli.define_flags): nothing is written.
  config_flags.DEFINE_config_file("config", None, "Config file[:arg], e.g. configs/coca.py:base",
                                  lock_config=True)
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  flags.mark_flags_as_required(["config"])
  jax.config.update("jax_platforms", "cpu")  # shapes only: never wait for an accelerator
  app.run(main)
