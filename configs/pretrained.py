"""Public two-tower architectures (OpenAI CLIP, open_clip, SigLIP) exactly, for their weights.

  python -m mmjax.convert --from openclip --checkpoint ViT-B-32.safetensors \
      --config configs/pretrained.py:openai_vit_b32 --out /tmp/clip_b32
  python -m mmjax.evaluate --config configs/pretrained.py:openai_vit_b32 --workdir /tmp/clip_b32
  python -m mmjax.train --config configs/pretrained.py:openai_vit_b32 --workdir /tmp/clip_b32 \
      --config.total_steps=100   # fine-tuning from the converted weights

Presets (the public model in brackets; open_clip names, Hugging Face repositories):
  openai_vit_b32      [ViT-B-32-quickgelu, openai/clip-vit-base-patch32]
  openai_vit_b16      [ViT-B-16-quickgelu, openai/clip-vit-base-patch16]
  openai_vit_l14      [ViT-L-14-quickgelu, openai/clip-vit-large-patch14]
  openai_vit_l14_336  [ViT-L-14-336-quickgelu, openai/clip-vit-large-patch14-336]
  openclip_vit_b32    [ViT-B-32 (GELU; the LAION / DataComp weights)]
  siglip_b16_224      [google/siglip-base-patch16-224]
  siglip_so400m_14_384 [google/siglip-so400m-patch14-384]
  openai_tiny, openclip_tiny, siglip_tiny: the same families at a size tests run in seconds.
  hf=<folder>: the architecture a Hugging Face CLIPModel / SiglipModel folder's config.json
  describes (what `mmjax.convert --from hf` uses when given no --config).

CLIP presets tokenize with OpenAI's BPE (data.tokenizer.kind="openclip", the installed
open_clip package's merges unless data.tokenizer.path names the file), 77 tokens; SigLIP ones
with the checkpoint folder's SentencePiece model (kind="siglip", data.tokenizer.path =
<folder>/spiece.model, which `mmjax.convert` copies next to the checkpoint), 64 tokens.
Data and evaluators are configs/shapes.py's (every key can be overridden).
"""
import json
import os

import ml_collections

from configs import openclip, schema, shapes

OPENAI_VOCAB_SIZE = 49408
SIGLIP_VOCAB_SIZE = 32000

# Architecture per preset: image size, patch, (width, depth, heads, mlp) per tower, embedding.
_CLIP_B = dict(text=(512, 12, 8, 2048), embed_dim=512, vision_width=768, vision_depth=12,
               vision_heads=12)
_CLIP_L = dict(text=(768, 12, 12, 3072), embed_dim=768, vision_width=1024, vision_depth=24,
               vision_heads=16)
ARCHITECTURES = {
    "openai_vit_b32": dict(family="openai", image_size=224, patch_size=32, **_CLIP_B),
    "openai_vit_b16": dict(family="openai", image_size=224, patch_size=16, **_CLIP_B),
    "openai_vit_l14": dict(family="openai", image_size=224, patch_size=14, **_CLIP_L),
    "openai_vit_l14_336": dict(family="openai", image_size=336, patch_size=14, **_CLIP_L),
    "openclip_vit_b32": dict(family="openclip", image_size=224, patch_size=32, **_CLIP_B),
    "siglip_b16_224": dict(family="siglip", image_size=224, patch_size=16,
                           text=(768, 12, 12, 3072), embed_dim=768, vision_width=768,
                           vision_depth=12, vision_heads=12),
    "siglip_so400m_14_384": dict(family="siglip", image_size=384, patch_size=14,
                                 text=(1152, 27, 16, 4304), embed_dim=1152,
                                 vision_width=1152, vision_depth=27, vision_heads=16,
                                 vision_mlp=4304),
    # Seconds-long models of each family for tests.
    "openai_tiny": dict(family="openai", image_size=32, patch_size=8, text=(32, 2, 4, 128),
                        embed_dim=24, vision_width=64, vision_depth=2, vision_heads=4,
                        context_length=16),
    "openclip_tiny": dict(family="openclip", image_size=32, patch_size=8,
                          text=(32, 2, 4, 128), embed_dim=24, vision_width=64,
                          vision_depth=2, vision_heads=4, context_length=16),
    "siglip_tiny": dict(family="siglip", image_size=32, patch_size=8, text=(48, 2, 4, 96),
                        embed_dim=48, vision_width=48, vision_depth=2, vision_heads=4,
                        vision_mlp=96, context_length=16),
}
PRESETS = tuple(ARCHITECTURES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "openai_vit_b32"
  if arg.startswith("hf="):
    arch = hf_architecture(os.path.expanduser(arg[len("hf="):]))
  elif arg in ARCHITECTURES:
    arch = ARCHITECTURES[arg]
  else:
    raise ValueError(f"configs/pretrained.py:{arg}: choose one of {PRESETS} or hf=<folder>")
  return build(arch, name=f"pretrained:{arg}", tiny=arg.endswith("_tiny"))


def build(arch: dict, name: str, tiny: bool = False) -> ml_collections.ConfigDict:
  """The config of one architecture dict (`ARCHITECTURES`' format)."""
  family = arch["family"]
  siglip = family == "siglip"
  c = shapes.get_config("siglip" if siglip else "clip")
  c.unlock()
  c.name = name
  del c.evals["captioning"]  # no caption decoder
  c.model = schema.two_tower_model()
  c.model.image_size = c.data.get_ref("image_size")
  c.model.text.vocab_size = c.data.tokenizer.get_ref("vocab_size")
  c.data.image_size = arch["image_size"]
  c.data.max_text_len = arch.get("context_length", 64 if siglip else 77)
  c.data.tokenizer.kind = "siglip" if siglip else "openclip"
  c.data.tokenizer.vocab_size = arch.get("vocab_size",
                                         SIGLIP_VOCAB_SIZE if siglip else OPENAI_VOCAB_SIZE)
  c.batch_size = 32
  c.eval_batch_size = 64
  m = c.model
  m.patch_size = arch["patch_size"]
  vw = arch["vision_width"]
  m.vision.update(width=vw, depth=arch["vision_depth"], num_heads=arch["vision_heads"],
                  mlp_dim=arch.get("vision_mlp", 4 * vw))
  tw, depth, heads, mlp = arch["text"]
  m.text.update(width=tw, num_layers=depth, num_heads=heads, mlp_dim=mlp)
  m.embed_dim = arch["embed_dim"]
  if siglip:
    # big_vision's SigLIP as transformers' SiglipModel: biased patch embedding, no class
    # token, no ln_pre, a MAP head and no image projection; a bidirectional text tower
    # pooled at its last slot with a biased head; tanh-GELU, LayerNorm eps 1e-6, images
    # in [-1, 1] (mean = std = 0.5: mmjax's own normalisation).
    m.vision.update(patch_bias=True, class_token=False, ln_pre=False, pool="map", proj=False)
    m.text.update(causal=False, pool="last", proj_bias=True)
    m.activation = "gelu_tanh"
    m.norm_eps = 1e-6
    m.image_norm = "none"
    shapes.use_sigmoid_logits(m)
  else:
    # OpenAI CLIP's ViT and causal text transformer pooled at the end-of-text token.
    m.vision.update(patch_bias=False, class_token=True, ln_pre=True, pool="cls", proj=True)
    m.text.update(causal=True, pool="eot", proj_bias=False)
    m.activation = "quick_gelu" if family == "openai" else "gelu"
    openclip.torch_clip_conventions(c)
  c.optimizer.learning_rate = 1e-5  # fine-tuning
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.1
  if tiny:
    schema.smoke_test_run(c)
    c.optimizer.warmup_steps = 2
    c.evals.retrieval.num_examples = c.evals.zeroshot.num_examples = 32
    c.evals.seen_classes.num_examples = 32
    c.evals.linear_probe.update(num_train=128, num_examples=32)
  c.lock()
  return c


def hf_architecture(folder: str) -> dict:
  """The architecture dict of a Hugging Face CLIPModel / SiglipModel folder's config.json.

  Raises ValueError naming the file when it is absent or of another model type."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file; a Hugging Face model folder holds config.json "
                     "next to model.safetensors")
  with open(path) as f:
    hf = json.load(f)
  kind = hf.get("model_type")
  if kind not in ("clip", "siglip"):
    raise ValueError(f"{path}: model_type {kind!r} is neither 'clip' (CLIPModel) nor "
                     "'siglip' (SiglipModel)")
  # transformers' defaults for keys a saved config may leave out (it writes them all).
  text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
  tw, vw = text.get("hidden_size", 512 if kind == "clip" else 768), vision.get(
      "hidden_size", 768)
  act = vision.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
  text_act = text.get("hidden_act", act)
  if act != text_act:
    raise ValueError(f"{path}: the towers use different activations ({act}, {text_act}); "
                     "mmjax's model has one model.activation")
  activations = {"quick_gelu": "openai", "gelu": "openclip", "gelu_pytorch_tanh": "siglip"}
  if act not in activations or (kind == "siglip") != (act == "gelu_pytorch_tanh"):
    raise ValueError(f"{path}: hidden_act {act!r} is not one mmjax expresses for "
                     f"model_type {kind!r}")
  arch = dict(
      family="siglip" if kind == "siglip" else activations[act],
      image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
      text=(tw, text.get("num_hidden_layers", 12), text.get("num_attention_heads", 8),
            text.get("intermediate_size", 4 * tw)),
      embed_dim=hf.get("projection_dim", 512) if kind == "clip" else vw,
      vision_width=vw, vision_depth=vision.get("num_hidden_layers", 12),
      vision_heads=vision.get("num_attention_heads", 12),
      vision_mlp=vision.get("intermediate_size", 4 * vw),
      context_length=text.get("max_position_embeddings", 77 if kind == "clip" else 64),
      vocab_size=text.get("vocab_size", OPENAI_VOCAB_SIZE if kind == "clip"
                          else SIGLIP_VOCAB_SIZE))
  if kind == "siglip" and text.get("projection_size", tw) != tw:
    raise ValueError(f"{path}: a SigLIP text projection_size != hidden_size is not "
                     "expressed by mmjax (the image side has no projection)")
  return arch
