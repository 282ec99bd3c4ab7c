"""Fine-tuning recipes on pretrained weights: LiT and CoCa initialised from a two-tower CLIP.

  # LiT (arXiv 2111.07991): the image tower locked, the text tower tuned from the checkpoint
  # (or trained from scratch with ,fresh_text).
  python -m mmjax.train --config configs/finetune.py:lit,openai_vit_b16 \
      --config.init.checkpoint=~/clip_b16 --workdir ~/lit_b16
  # CoCa from a CLIP: its ViT and unimodal text decoder from the CLIP's towers, poolers and
  # multimodal decoder fresh; the image tower locked for the first 10% of the steps.
  python -m mmjax.train --config configs/finetune.py:coca_from_clip,coca_vit_b32 \
      --config.init.checkpoint=~/clip_b32 --workdir ~/coca_b32

`~/clip_b16` is what `python -m mmjax.convert` wrote (guide §10). Presets:
  lit,<configs/pretrained.py preset>[,fresh_text]   e.g. lit,openai_vit_b16 / lit,openai_tiny
  coca_from_clip,coca_vit_b32   CoCa-B/32 (configs/openclip.py) from open_clip's GELU ViT-B-32
                                (configs/pretrained.py:openclip_vit_b32: same widths, depths,
                                heads and vocabulary)
  coca_from_clip,coca_tiny      the same at test size, from pretrained.py:openai_tiny
"""
import ml_collections

from configs import openclip, pretrained

# The image tower of a two-tower model (`mmjax.models.two_tower`): ViT, MAP head, projection.
TWO_TOWER_IMAGE = "(vision|map_head|image_proj)/.*"
# CoCa's parameters from a two-tower CLIP's (TARGET=SOURCE, mmjax.warm_start): the ViT by
# the same names, the unimodal decoder from the text transformer; the image projection (its
# input is the pooler's width here) and everything else CoCa has on its own stay fresh.
COCA_FROM_CLIP_RULES = (
    "token_embed/embedding=text/token_embed/embedding",
    "unimodal/pos_embed=text/pos_embed",
    r"unimodal/decoder/(.*)=text/encoder/\1",
    "image_proj/.*=",
)
COCA_SOURCES = {"coca_vit_b32": "openclip_vit_b32", "coca_tiny": "openai_tiny"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  recipe, *rest = (arg or "lit,openai_vit_b16").split(",")
  if recipe == "lit" and rest:
    return lit(rest[0], fresh_text="fresh_text" in rest[1:])
  if recipe == "coca_from_clip" and rest and rest[0] in COCA_SOURCES:
    return coca_from_clip(rest[0])
  raise ValueError(f"configs/finetune.py:{arg}: choose lit,<pretrained preset>[,fresh_text] "
                   f"or coca_from_clip,<{'|'.join(COCA_SOURCES)}>")


def lit(preset: str, fresh_text: bool = False) -> ml_collections.ConfigDict:
  """LiT: the pretrained image tower locked (no optimizer state, no backward pass), the text
  tower tuned at the preset's rate, or from scratch at LiT's 1e-3 with `fresh_text`."""
  c = pretrained.get_config(preset)
  c.unlock()
  c.name = f"finetune:lit,{preset}" + (",fresh_text" if fresh_text else "")
  c.optimizer.frozen = TWO_TOWER_IMAGE
  if fresh_text:
    c.init.rules = ("text/.*=", "text_proj/.*=")
    c.optimizer.learning_rate = 1e-3
  c.lock()
  return c


def coca_from_clip(variant: str) -> ml_collections.ConfigDict:
  """CoCa (configs/openclip.py:<variant>) warm-started from a two-tower CLIP checkpoint, the
  image tower locked for the first tenth of the run (at least one step), then trained."""
  c = openclip.get_config(variant)
  c.unlock()
  c.name = f"finetune:coca_from_clip,{variant}"
  c.init.rules = COCA_FROM_CLIP_RULES
  if pretrained.ARCHITECTURES[COCA_SOURCES[variant]]["embed_dim"] != c.model.embed_dim:
    c.init.rules += ("text_proj/.*=",)  # tiny: the CLIP's embedding is narrower
  c.optimizer.frozen = "vision/.*"
  c.optimizer.frozen_until_step = max(c.total_steps // 10, 1)
  c.lock()
  return c
