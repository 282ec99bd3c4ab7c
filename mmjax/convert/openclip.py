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
import re
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from configs import openclip as openclip_configs
from mmjax import checkpoint, runtime, state as state_lib
from mmjax.data import tokenizer as tokenizer_lib

Array = np.ndarray


# --- state dict loading ---------------------------------------------------------------------
def load_state_dict(path: str) -> dict[str, Array]:
  """An open_clip state dict as float32 numpy arrays.

  `.safetensors` is read without torch; `.pt`/`.bin`/`.pth` need torch. Training checkpoints
  ({"state_dict": ...}, keys prefixed "module." by DDP) are unwrapped.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    raw = load_file(path)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, Mapping) and "state_dict" in raw:
      raw = raw["state_dict"]
    raw = {k: v.detach().float().numpy() for k, v in raw.items()}
  return {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in raw.items()}


# --- key mapping ----------------------------------------------------------------------------
def _dense(weight: Array, bias: Array | None = None) -> dict[str, Any]:
  """torch Linear weight [out, in] (+ bias [out]) -> layers.Dense params."""
  out = {"kernel": weight.T}
  if bias is not None:
    out["bias"] = bias
  return {"dense": out}


def _norm(sd: dict[str, Array], prefix: str) -> dict[str, Any]:
  return {"norm": {"scale": sd.pop(prefix + ".weight"), "bias": sd.pop(prefix + ".bias")}}


def _mha(sd: dict[str, Array], prefix: str) -> dict[str, Any]:
  """nn.MultiheadAttention -> layers.Attention {query, key, value, out}."""
  if prefix + ".in_proj_weight" in sd:
    wq, wk, wv = np.split(sd.pop(prefix + ".in_proj_weight"), 3)
  else:  # kdim/vdim != embed_dim: separate projections
    wq, wk, wv = (sd.pop(f"{prefix}.{n}_proj_weight") for n in "qkv")
  bq, bk, bv = np.split(sd.pop(prefix + ".in_proj_bias"), 3)
  return {"query": _dense(wq, bq), "key": _dense(wk, bk), "value": _dense(wv, bv),
          "out": _dense(sd.pop(prefix + ".out_proj.weight"), sd.pop(prefix + ".out_proj.bias"))}


def _mlp(sd: dict[str, Array], prefix: str) -> dict[str, Any]:
  return {"fc1": _dense(sd.pop(prefix + ".c_fc.weight"), sd.pop(prefix + ".c_fc.bias")),
          "fc2": _dense(sd.pop(prefix + ".c_proj.weight"), sd.pop(prefix + ".c_proj.bias"))}


def _self_block(sd: dict[str, Array], prefix: str) -> dict[str, Any]:
  """ResidualAttentionBlock -> layers.TransformerBlock (no cross-attention)."""
  return {"ln_self": _norm(sd, prefix + ".ln_1"), "self_attn": _mha(sd, prefix + ".attn"),
          "ln_mlp": _norm(sd, prefix + ".ln_2"), "mlp": _mlp(sd, prefix + ".mlp")}


def _cross_block(sd: dict[str, Array], prefix: str) -> dict[str, Any]:
  """ResidualAttentionBlock(is_cross_attention=True) -> text.CrossAttentionBlock."""
  return {"ln_q": _norm(sd, prefix + ".ln_1"), "ln_kv": _norm(sd, prefix + ".ln_1_kv"),
          "attn": _mha(sd, prefix + ".attn"), "ln_mlp": _norm(sd, prefix + ".ln_2"),
          "mlp": _mlp(sd, prefix + ".mlp")}


def _num_layers(sd: Mapping[str, Array], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return len({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _stack(per_layer: list[dict[str, Any]], scan: bool) -> dict[str, Any]:
  """Scanned: one tree under `layers` with a leading layer axis; else `layers_<i>`."""
  if scan:
    return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}
  return {f"layers_{i}": layer for i, layer in enumerate(per_layer)}


def convert_state_dict(state_dict: Mapping[str, Array], config: Any) -> dict[str, Any]:
  """open_clip CoCa state dict -> mmjax CoCa params (numpy, unboxed).

  `config`: an mmjax config built by configs/openclip.py (pooler="openclip", ...). Raises
  ValueError if the state dict has entries this mapping does not consume (an architecture
  mmjax cannot express would otherwise be dropped silently). Shapes are checked against
  the model by `check_params`.
  """
  m = config.model
  if m.pooler != "openclip" or m.text.multimodal_block != "openclip":
    raise ValueError("convert_state_dict needs an open_clip-style config (model.pooler="
                     "'openclip', model.text.multimodal_block='openclip'): configs/openclip.py")
  scan = m.scan_layers
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  conv = sd.pop("visual.conv1.weight")  # [D, 3, p, p]
  vision = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0)},  # HWIO
      "cls": sd.pop("visual.class_embedding"),
      "pos_embed": sd.pop("visual.positional_embedding"),
      "ln_pre": _norm(sd, "visual.ln_pre"),
      "encoder": _stack([_self_block(sd, f"visual.transformer.resblocks.{i}")
                         for i in range(_num_layers(sd, "visual.transformer.resblocks"))], scan),
  }
  pooler = {"queries": sd.pop("visual.attn_pool.query"),
            "ln_q": _norm(sd, "visual.attn_pool.ln_q"),
            "ln_k": _norm(sd, "visual.attn_pool.ln_k"),
            "attn": _mha(sd, "visual.attn_pool.attn"),
            "ln_out": _norm(sd, "visual.ln_post")}  # open_clip's ln_post follows the pooler
  unimodal = {
      "cls": sd.pop("text.cls_emb"),
      "pos_embed": sd.pop("text.positional_embedding"),
      "decoder": _stack([_self_block(sd, f"text.transformer.resblocks.{i}")
                         for i in range(_num_layers(sd, "text.transformer.resblocks"))], scan),
      "ln_cls": _norm(sd, "text.ln_final"),  # open_clip normalises only the pooled CLS
  }
  multimodal = {
      "decoder": _stack([
          {"self_block": _self_block(sd, f"text_decoder.resblocks.{i}"),
           "cross_block": _cross_block(sd, f"text_decoder.cross_attn.{i}")}
          for i in range(_num_layers(sd, "text_decoder.resblocks"))], scan),
      "ln_final": _norm(sd, "text_decoder.ln_final"),
  }
  params = {
      "vision": vision,
      "caption_pooler": pooler,
      "image_proj": {"dense": {"kernel": sd.pop("visual.proj")}},  # x @ proj: [in, out]
      "token_embed": {"embedding": sd.pop("text.token_embedding.weight")},
      "unimodal": unimodal,
      "text_proj": {"dense": {"kernel": sd.pop("text.text_projection")}},
      "multimodal": multimodal,
      "lm_head": {"dense": {"kernel": sd.pop("text_decoder.text_projection")}},
      # Both store the log of the temperature; mmjax's forward caps exp() at the max.
      "logit_scale": np.asarray(sd.pop("logit_scale"), np.float32).reshape(()),
  }
  # Non-persistent buffers are never in state dicts; anything left is an unsupported part.
  if sd:
    raise ValueError(f"open_clip state dict entries not understood by the CoCa mapping "
                     f"(unsupported architecture option?): {sorted(sd)[:10]}")
  return params


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
  """open_clip's BPE merges to store with the converted checkpoint (self-contained: it
  loads without open_clip installed); None when they cannot be found here."""
  if config.data.tokenizer.kind != "openclip":
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
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  timings = convert_checkpoint(f.checkpoint, f.config, os.path.expanduser(f.out))
  print(f"wrote {os.path.join(f.out, 'checkpoints', '0')} ("
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ")")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  flags.DEFINE_string("checkpoint", None, "open_clip state dict (.safetensors, .pt, .bin).")
  flags.DEFINE_string("out", None, "Output workdir (gets checkpoints/0).")
  config_flags.DEFINE_config_file(
      "config", None, "configs/openclip.py:<variant> with --config.KEY overrides (the "
      "optimizer settings must match the later mmjax.train run).", lock_config=True)
  flags.mark_flags_as_required(["checkpoint", "out", "config"])
  app.run(main)
