"""Two-tower (CLIP / SigLIP) weights: open_clip's `CLIP` and transformers' `CLIPModel` /
`SiglipModel` state dicts <-> mmjax's `two_tower` parameters (configs/pretrained.py).

One table per format (`rules`), read in both directions by `mmjax.convert.mapping`:
torch Linear weights [out, in] are kernels [in, out]; packed attention in_proj weights
([3D, D]) split into query/key/value; the patch conv [D, 3, p, p] is HWIO [p, p, 3, D];
open_clip's raw projections (`x @ proj`) are already [in, out]; transformers' SigLIP stores
the logit scale and bias as [1] and its probe as [1, 1, D].
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from mmjax.convert import mapping as m
from mmjax.models import two_tower

FORMATS = ("openclip", "hf")
CONV_TO_HWIO = (2, 3, 1, 0)


def hf_model_type(config: ml_collections.ConfigDict) -> str:
  """"siglip" (transformers' SiglipModel) or "clip" (CLIPModel) for a two_tower config."""
  return "siglip" if config.model.vision.pool == "map" else "clip"


def check_expressible(config: ml_collections.ConfigDict, fmt: str) -> None:
  """Raises ValueError naming the config keys a format cannot express."""
  mc, v, t = config.model, config.model.vision, config.model.text
  clip = dict(vision=dict(patch_bias=False, class_token=True, ln_pre=True, pool="cls",
                          proj=True), text=dict(causal=True, pool="eot", proj_bias=False))
  siglip = dict(vision=dict(patch_bias=True, class_token=False, ln_pre=False, pool="map",
                            proj=False), text=dict(causal=False, pool="last", proj_bias=True))
  if fmt == "openclip":
    wanted = [clip]
  elif fmt == "hf":
    wanted = [siglip if hf_model_type(config) == "siglip" else clip]
  else:
    raise ValueError(f"unknown format {fmt!r}: choose one of {FORMATS}")
  want = wanted[0]
  wrong = [f"model.{tower}.{k}={section[k]!r} (needs {value!r})"
           for tower, section in (("vision", v), ("text", t))
           for k, value in want[tower].items() if section[k] != value]
  if mc.logit_bias != (want is siglip):
    wrong.append(f"model.logit_bias={mc.logit_bias} (needs {want is siglip})")
  if wrong:
    raise ValueError(f"a two_tower model with {', '.join(wrong)} has no {fmt} "
                     f"{'SigLIP' if want is siglip else 'CLIP'} form")


def _block(torch_prefix: str, path: str, fmt: str) -> list[m.Rule]:
  """One pre-LN transformer layer."""
  if fmt == "openclip":
    return [*m.norm(f"{torch_prefix}.ln_1", f"{path}/ln_self"),
            *m.packed_attention(f"{torch_prefix}.attn", f"{path}/self_attn"),
            *m.norm(f"{torch_prefix}.ln_2", f"{path}/ln_mlp"),
            *m.linear(f"{torch_prefix}.mlp.c_fc", f"{path}/mlp/fc1"),
            *m.linear(f"{torch_prefix}.mlp.c_proj", f"{path}/mlp/fc2")]
  return [*m.norm(f"{torch_prefix}.layer_norm1", f"{path}/ln_self"),
          *m.separate_attention(f"{torch_prefix}.self_attn", f"{path}/self_attn"),
          *m.norm(f"{torch_prefix}.layer_norm2", f"{path}/ln_mlp"),
          *m.linear(f"{torch_prefix}.mlp.fc1", f"{path}/mlp/fc1"),
          *m.linear(f"{torch_prefix}.mlp.fc2", f"{path}/mlp/fc2")]


def rules(config: ml_collections.ConfigDict, fmt: str) -> list[m.Rule]:
  """The table of `config`'s two_tower model in `fmt` ("openclip" or "hf")."""
  check_expressible(config, fmt)
  mc = config.model
  vision_layers = [f"vision/encoder/layers_{i}" for i in range(mc.vision.depth)]
  text_layers = [f"text/encoder/layers_{i}" for i in range(mc.text.num_layers)]
  if fmt == "openclip":
    return [
        m.transpose("visual.conv1.weight", "vision/patch_embed/kernel", CONV_TO_HWIO),
        m.copy("visual.class_embedding", "vision/cls"),
        m.copy("visual.positional_embedding", "vision/pos_embed"),
        *m.norm("visual.ln_pre", "vision/ln_pre"),
        *[r for i, p in enumerate(vision_layers)
          for r in _block(f"visual.transformer.resblocks.{i}", p, fmt)],
        *m.norm("visual.ln_post", "vision/ln_post"),
        m.copy("visual.proj", "image_proj/dense/kernel"),
        m.copy("token_embedding.weight", "text/token_embed/embedding"),
        m.copy("positional_embedding", "text/pos_embed"),
        *[r for i, p in enumerate(text_layers)
          for r in _block(f"transformer.resblocks.{i}", p, fmt)],
        *m.norm("ln_final", "text/ln_final"),
        m.copy("text_projection", "text_proj/dense/kernel"),
        m.copy("logit_scale", "logit_scale"),
    ]
  vision = [*[r for i, p in enumerate(vision_layers)
              for r in _block(f"vision_model.encoder.layers.{i}", p, fmt)],
            *m.norm("vision_model.post_layernorm", "vision/ln_post"),
            m.transpose("vision_model.embeddings.patch_embedding.weight",
                        "vision/patch_embed/kernel", CONV_TO_HWIO),
            m.copy("vision_model.embeddings.position_embedding.weight", "vision/pos_embed")]
  text = [m.copy("text_model.embeddings.token_embedding.weight", "text/token_embed/embedding"),
          m.copy("text_model.embeddings.position_embedding.weight", "text/pos_embed"),
          *[r for i, p in enumerate(text_layers)
            for r in _block(f"text_model.encoder.layers.{i}", p, fmt)],
          *m.norm("text_model.final_layer_norm", "text/ln_final")]
  if hf_model_type(config) == "clip":
    return [*vision,
            m.copy("vision_model.embeddings.class_embedding", "vision/cls"),
            *m.norm("vision_model.pre_layrnorm", "vision/ln_pre"),  # sic, transformers' name
            *m.linear("visual_projection", "image_proj", bias=False),
            *text,
            *m.linear("text_projection", "text_proj", bias=False),
            m.copy("logit_scale", "logit_scale")]
  width = mc.vision.width
  return [*vision,
          m.copy("vision_model.embeddings.patch_embedding.bias", "vision/patch_embed/bias"),
          m.copy("vision_model.head.probe", "map_head/probe", torch_shape=(1, 1, width),
                 mmjax_shape=(1, width)),
          *m.packed_attention("vision_model.head.attention", "map_head/attn"),
          *m.norm("vision_model.head.layernorm", "map_head/ln"),
          *m.linear("vision_model.head.mlp.fc1", "map_head/mlp/fc1"),
          *m.linear("vision_model.head.mlp.fc2", "map_head/mlp/fc2"),
          *text,
          *m.linear("text_model.head", "text_proj"),
          m.copy("logit_scale", "logit_scale", torch_shape=(1,), mmjax_shape=()),
          m.copy("logit_bias", "logit_bias", torch_shape=(1,), mmjax_shape=())]


def import_state_dict(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                      fmt: str, source: str) -> dict[str, Any]:
  """A state dict of `fmt` -> `config`'s parameters. A checkpoint made for another image
  size gets its position embedding resized bicubically on the patch grid."""
  sd = dict(state_dict)
  table = rules(config, fmt)
  pos_key = ("visual.positional_embedding" if fmt == "openclip"
             else "vision_model.embeddings.position_embedding.weight")
  prefix = int(config.model.vision.class_token)
  grid = config.model.image_size // config.model.patch_size
  if pos_key in sd and sd[pos_key].shape[0] != prefix + grid * grid:
    sd[pos_key] = two_tower.resize_position_embedding(sd[pos_key], prefix, grid)
  return m.to_params(sd, table, config.model.scan_layers, source)


def export_state_dict(params: Any, config: ml_collections.ConfigDict,
                      fmt: str) -> dict[str, np.ndarray]:
  return m.to_state_dict(params, rules(config, fmt))


def hf_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """transformers' config.json (CLIPConfig / SiglipConfig) of a two_tower config."""
  mc, v, t = config.model, config.model.vision, config.model.text
  act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[
      mc.activation]
  common = dict(hidden_act=act, layer_norm_eps=mc.norm_eps)
  text = dict(common, hidden_size=t.width, intermediate_size=t.mlp_dim,
              num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
              vocab_size=t.vocab_size, max_position_embeddings=config.data.max_text_len)
  vision = dict(common, hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                image_size=mc.image_size, patch_size=mc.patch_size, num_channels=3)
  if hf_model_type(config) == "siglip":
    text.update(model_type="siglip_text_model", pad_token_id=1, eos_token_id=1)
    vision.update(model_type="siglip_vision_model")
    return dict(architectures=["SiglipModel"], model_type="siglip", text_config=text,
                vision_config=vision, torch_dtype="float32")
  # OpenAI's BPE ids; transformers pools at the first eos_token_id (49407, the EOT).
  text.update(model_type="clip_text_model", projection_dim=mc.embed_dim, bos_token_id=49406,
              eos_token_id=49407, pad_token_id=1)
  vision.update(model_type="clip_vision_model", projection_dim=mc.embed_dim)
  return dict(architectures=["CLIPModel"], model_type="clip", text_config=text,
              vision_config=vision, projection_dim=mc.embed_dim,
              logit_scale_init_value=float(np.log(mc.logit_scale_init)),
              torch_dtype="float32")


def openclip_model_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """open_clip's model config (model_configs/*.json format) of a CLIP two_tower config;
  register it as `open_clip.factory._MODEL_CONFIGS[name]` to build the torch model."""
  check_expressible(config, "openclip")
  mc, v, t = config.model, config.model.vision, config.model.text
  for tower, section, width in (("vision", v, v.width), ("text", t, t.width)):
    if section.mlp_dim != 4 * width:
      raise ValueError(f"config model.{tower}.mlp_dim={section.mlp_dim}: open_clip's towers "
                       f"are 4 x width ({4 * width})")
  out = dict(embed_dim=mc.embed_dim,
             vision_cfg=dict(image_size=mc.image_size, layers=v.depth, width=v.width,
                             patch_size=mc.patch_size, head_width=v.width // v.num_heads),
             text_cfg=dict(context_length=config.data.max_text_len, vocab_size=t.vocab_size,
                           width=t.width, heads=t.num_heads, layers=t.num_layers))
  if mc.activation == "quick_gelu":
    out["quick_gelu"] = True
  elif mc.activation != "gelu":
    raise ValueError(f"config model.activation={mc.activation!r}: open_clip's CLIP uses "
                     "gelu or quick_gelu")
  return out
