"""Convert open_clip CoCa checkpoints to mmjax checkpoints.

  python -m mmjax.convert.openclip --checkpoint open_clip_model.safetensors \
      --config configs/openclip.py:coca_vit_b32 --out /tmp/coca_b32 \
      [--config.optimizer.name=adafactor ...]
  python -m mmjax.evaluate --config configs/openclip.py:coca_vit_b32 --workdir /tmp/coca_b32

Writes `<out>/checkpoints/0/{state,config,data}` (mmjax.checkpoint.Checkpointer) holding the
converted parameters and a freshly initialised optimizer state, so `mmjax.train` with the same
config (and optimizer settings) fine-tunes from it and `mmjax.evaluate` evaluates it.

Layout changes (torch -> flax): Linear weights [out, in] are transposed to kernels
[in, out]; nn.MultiheadAttention's packed in_proj ([3D, D] + [3D]) or separate
q/k/v_proj_weight (the pooler, whose keys have the image width) become query/key/value
Denses; the patch conv [D, 3, p, p] becomes HWIO [p, p, 3, D]; raw projection parameters
(`x @ proj`) are already [in, out]; per-layer weights are stacked on a leading `layers`
axis when the config scans layers. `tests/test_openclip.py` checks forward parity.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from configs import openclip as openclip_configs
from mmjax import checkpoint, command, runtime, state as state_lib
from mmjax.convert import files, mapping
from mmjax.data import tokenizer as tokenizer_lib

Array = np.ndarray


# --- state dict loading ---------------------------------------------------------------------
def load_state_dict(path: str) -> dict[str, Array]:
  """An open_clip state dict as NumPy arrays (`mmjax.convert.files.load_state_dict`: never
  unpickles more than tensors)."""
  return files.load_state_dict(path)


# --- key mapping (one table, both directions: mmjax.convert.mapping) ------------------------
def _self_block(prefix: str, path: str) -> list[mapping.Rule]:
  """ResidualAttentionBlock -> layers.TransformerBlock (no cross-attention)."""
  return [*mapping.norm(f"{prefix}.ln_1", f"{path}/ln_self"),
          *mapping.packed_attention(f"{prefix}.attn", f"{path}/self_attn"),
          *mapping.norm(f"{prefix}.ln_2", f"{path}/ln_mlp"),
          *mapping.linear(f"{prefix}.mlp.c_fc", f"{path}/mlp/fc1"),
          *mapping.linear(f"{prefix}.mlp.c_proj", f"{path}/mlp/fc2")]


def _cross_block(prefix: str, path: str) -> list[mapping.Rule]:
  """ResidualAttentionBlock(is_cross_attention=True) -> text.CrossAttentionBlock."""
  return [*mapping.norm(f"{prefix}.ln_1", f"{path}/ln_q"),
          *mapping.norm(f"{prefix}.ln_1_kv", f"{path}/ln_kv"),
          *mapping.packed_attention(f"{prefix}.attn", f"{path}/attn"),
          *mapping.norm(f"{prefix}.ln_2", f"{path}/ln_mlp"),
          *mapping.linear(f"{prefix}.mlp.c_fc", f"{path}/mlp/fc1"),
          *mapping.linear(f"{prefix}.mlp.c_proj", f"{path}/mlp/fc2")]


def _pooler_attention(prefix: str, path: str, separate: bool) -> list[mapping.Rule]:
  """nn.MultiheadAttention of the pooler: packed in_proj when the image width is the
  pooler's, else (kdim != embed_dim) separate q/k/v_proj_weight with a packed bias."""
  if not separate:
    return mapping.packed_attention(prefix, path)
  names = ("query", "key", "value")
  return [*[mapping.transpose(f"{prefix}.{n}_proj_weight", f"{path}/{name}/dense/kernel")
            for n, name in zip("qkv", names)],
          mapping.Rule((f"{prefix}.in_proj_bias",),
                       tuple((*path.split("/"), n, "dense", "bias") for n in names),
                       lambda b: tuple(np.split(b, 3)),
                       lambda q, k, v: (np.concatenate([q, k, v]),)),
          *mapping.linear(f"{prefix}.out_proj", f"{path}/out")]


def coca_rules(config: Any) -> list[mapping.Rule]:
  """open_clip CoCa state dict <-> mmjax CoCa params, for a configs/openclip.py config."""
  m = config.model
  if m.pooler != "openclip" or m.text.multimodal_block != "openclip":
    raise ValueError("the open_clip CoCa mapping needs an open_clip-style config (model.pooler="
                     "'openclip', model.text.multimodal_block='openclip'): configs/openclip.py")
  vision = [r for i in range(m.vision.depth)
            for r in _self_block(f"visual.transformer.resblocks.{i}", f"vision/encoder/layers_{i}")]
  unimodal = [r for i in range(m.text.num_uni_layers)
              for r in _self_block(f"text.transformer.resblocks.{i}",
                                   f"unimodal/decoder/layers_{i}")]
  multimodal = [r for i in range(m.text.num_multi_layers) for r in (
      *_self_block(f"text_decoder.resblocks.{i}", f"multimodal/decoder/layers_{i}/self_block"),
      *_cross_block(f"text_decoder.cross_attn.{i}",
                    f"multimodal/decoder/layers_{i}/cross_block"))]
  return [
      mapping.transpose("visual.conv1.weight", "vision/patch_embed/kernel", (2, 3, 1, 0)),
      mapping.copy("visual.class_embedding", "vision/cls"),
      mapping.copy("visual.positional_embedding", "vision/pos_embed"),
      *mapping.norm("visual.ln_pre", "vision/ln_pre"),
      *vision,
      mapping.copy("visual.attn_pool.query", "caption_pooler/queries"),
      *mapping.norm("visual.attn_pool.ln_q", "caption_pooler/ln_q"),
      *mapping.norm("visual.attn_pool.ln_k", "caption_pooler/ln_k"),
      *_pooler_attention("visual.attn_pool.attn", "caption_pooler/attn",
                         separate=m.vision.width != m.embed_dim),
      *mapping.norm("visual.ln_post", "caption_pooler/ln_out"),  # ln_post follows the pooler
      mapping.copy("visual.proj", "image_proj/dense/kernel"),  # x @ proj: [in, out]
      mapping.copy("text.token_embedding.weight", "token_embed/embedding"),
      mapping.copy("text.cls_emb", "unimodal/cls"),
      mapping.copy("text.positional_embedding", "unimodal/pos_embed"),
      *unimodal,
      *mapping.norm("text.ln_final", "unimodal/ln_cls"),  # open_clip normalises only the CLS
      mapping.copy("text.text_projection", "text_proj/dense/kernel"),
      *multimodal,
      *mapping.norm("text_decoder.ln_final", "multimodal/ln_final"),
      mapping.copy("text_decoder.text_projection", "lm_head/dense/kernel"),
      # Both store the log of the temperature; mmjax's forward caps exp() at the max.
      mapping.copy("logit_scale", "logit_scale"),
  ]


def convert_state_dict(state_dict: Mapping[str, Array], config: Any) -> dict[str, Any]:
  """open_clip CoCa state dict -> mmjax CoCa params (numpy, unboxed, float32).

  `config`: an mmjax config built by configs/openclip.py (pooler="openclip", ...). Raises
  ValueError if the state dict lacks entries or has entries this mapping does not consume
  (an architecture mmjax cannot express would otherwise be dropped silently). Shapes are
  checked against the model by `check_params`.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  return mapping.to_params(sd, coca_rules(config), config.model.scan_layers,
                           "the open_clip CoCa state dict")


def export_state_dict(params: Any, config: Any) -> dict[str, Array]:
  """mmjax CoCa params -> the open_clip CoCa state dict (`convert_state_dict`'s inverse)."""
  return mapping.to_state_dict(params, coca_rules(config))


def openclip_model_config_of(config: Any) -> dict:
  """open_clip's model config (model_configs/*.json format) of a configs/openclip.py-style
  CoCa config: `openclip_configs.openclip_model_config`'s inverse, read from the keys."""
  coca_rules(config)  # refuses configs that are not open_clip's CoCa
  m = config.model
  v, t = m.vision, m.text
  for tower, mlp, width in (("vision", v.mlp_dim, v.width), ("text", t.mlp_dim, t.width)):
    if mlp != 4 * width:
      raise ValueError(f"config model.{tower}.mlp_dim={mlp}: open_clip's towers are 4 x "
                       f"width ({4 * width})")
  if t.num_uni_layers != t.num_multi_layers:
    raise ValueError("open_clip's CoCa has as many multimodal as unimodal text layers")
  text = dict(context_length=config.data.max_text_len - 1, vocab_size=t.vocab_size,
              width=t.width, heads=t.num_heads, layers=t.num_uni_layers)
  out = dict(
      embed_dim=m.embed_dim,
      vision_cfg=dict(image_size=m.image_size, layers=v.depth, width=v.width,
                      patch_size=m.patch_size, attentional_pool=True,
                      attn_pooler_heads=m.pooler_heads or t.num_heads, output_tokens=True,
                      attn_pooler_queries=m.num_caption_queries + 1,
                      head_width=v.width // v.num_heads),
      text_cfg=dict(text, embed_cls=True, output_tokens=True),
      multimodal_cfg=dict(text, attn_pooler_heads=t.num_heads),
      custom_text=True)
  if m.activation == "quick_gelu":
    out["quick_gelu"] = True
  return out


# --- checking and writing -------------------------------------------------------------------
def check_params(params: Any, config: Any) -> None:
  """Raises CheckpointMismatchError naming the first parameter whose shape is wrong."""
  stored = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  expected = runtime.build(config, jax.devices()[:1], params_only=True).abstract_state
  checkpoint.check_shapes(stored, expected, "<converted open_clip>", 0)


def write_checkpoint(params: Any, config: Any, out: str,
                     assets: dict[str, bytes] | None = None) -> str:
  """Saves `params` with a fresh optimizer state as step 0 of `<out>/checkpoints`, sharded
  exactly as `mmjax.train` restores it, with `assets` (`Checkpointer.save`). Returns the
  checkpoint directory."""
  rt = runtime.build(config)
  checkpointer = checkpoint.Checkpointer(out, config)
  if checkpointer.latest_step() is not None:
    raise FileExistsError(f"{checkpointer.directory} already holds step "
                          f"{checkpointer.latest_step()}; choose an empty --out")
  with rt.activate():
    placed = jax.device_put(params, rt.shardings.params)
    make = jax.jit(lambda p: state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=rt.optimizer.init(p),
        nonfinite_steps=jnp.zeros((), jnp.int32)), out_shardings=rt.shardings)
    checkpointer.save(0, make(placed), config, assets=assets)
  checkpointer.close()
  return checkpointer.directory


def tokenizer_assets(config: Any) -> dict[str, bytes] | None:
  """open_clip's BPE merges (or SigLIP's SentencePiece model) to store with the converted
  checkpoint (self-contained: it loads without open_clip installed or the checkpoint
  folder); None when they cannot be found here."""
  if config.data.tokenizer.kind not in ("openclip", "siglip"):
    return None
  try:
    return tokenizer_lib.checkpoint_assets(tokenizer_lib.get_tokenizer(config))
  except (ModuleNotFoundError, FileNotFoundError) as e:
    print(f"not storing the tokenizer with the checkpoint: {e}", flush=True)
    return None


def convert_checkpoint(checkpoint_path: str, config: Any, out: str) -> dict[str, float]:
  """Reads, converts, shape-checks and writes; returns timings in seconds."""
  t0 = time.perf_counter()
  state_dict = load_state_dict(checkpoint_path)
  t1 = time.perf_counter()
  params = convert_state_dict(state_dict, config)
  del state_dict
  check_params(params, config)
  t2 = time.perf_counter()
  write_checkpoint(params, config, out, tokenizer_assets(config))
  t3 = time.perf_counter()
  return {"load_s": t1 - t0, "convert_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0}


def openclip_coca(variant: str, seed: int = 0, perturb: bool = False,
                  legacy_mask: bool = True) -> Any:
  """open_clip's torch CoCa with configs/openclip.py:<variant>'s architecture, randomly
  initialised from torch seed `seed` (what parity tests and benchmarks compare against).

  perturb: give every parameter (but the logit scale) a N(0, 0.02) component, and the
  caption head N(0, 1/width) weights. open_clip 3.3.0 leaves that head as torch.empty
  (often zeros, which makes logit parity vacuous), and zero biases / unit LayerNorm scales
  would hide swapped or misordered entries in a conversion.
  legacy_mask: open_clip's default (and pretrained CoCa weights') CLS attention mask,
  `text.correct_cls_mask=False`, as configs/openclip.py's `legacy_mask=1` default; False
  sets the corrected mask (open_clip reads the flag at forward time, no model config sets
  it).
  """
  import open_clip  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  name = f"mmjax_{variant}"
  model_configs = open_clip.factory._MODEL_CONFIGS  # pylint: disable=protected-access
  model_configs[name] = openclip_configs.openclip_model_config(variant)
  torch.manual_seed(seed)
  model = open_clip.create_model(name, pretrained=None)
  if perturb:
    with torch.no_grad():
      width = model.text_decoder.text_projection.shape[0]
      model.text_decoder.text_projection.normal_(std=width ** -0.5)
      for p in model.parameters():
        if p is not model.logit_scale:
          p.add_(torch.randn_like(p) * 0.02)
  model.text.correct_cls_mask = not legacy_mask
  return model


# --- CLI ------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  timings = convert_checkpoint(f.checkpoint, command.config(), os.path.expanduser(f.out))
  print(f"wrote {os.path.join(f.out, 'checkpoints', '0')} ("
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ")")


if __name__ == "__main__":
  # --config: configs/openclip.py:<variant>; its optimizer settings must match the later
  # mmjax.train run.
  flags.DEFINE_string("checkpoint", None, "open_clip state dict (.safetensors, .pt, .bin).")
  flags.DEFINE_string("out", None, "Output workdir (gets checkpoints/0).")
  command.run(main, "mmjax.convert.openclip", required=("checkpoint", "out"))
