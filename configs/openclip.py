"""open_clip's CoCa architectures in mmjax, for converted checkpoints (`mmjax.convert.openclip`).

  python -m mmjax.convert.openclip --checkpoint open_clip_model.safetensors \
      --config configs/openclip.py:coca_vit_b32 --out /tmp/coca_b32
  python -m mmjax.evaluate --config configs/openclip.py:coca_vit_b32 --workdir /tmp/coca_b32
  python -m mmjax.train --config configs/openclip.py:coca_vit_b32 --workdir /tmp/coca_b32 \
      --config.total_steps=100 --config.loss.contrastive_weight=0   # caption fine-tuning

Variants (open_clip model config in brackets): coca_vit_b32 [coca_ViT-B-32],
coca_vit_l14 [coca_ViT-L-14], coca_tiny [`openclip_model_config("coca_tiny")`, for tests].
Append ",legacy_mask=0" for weights trained with open_clip's corrected CLS mask
(`text_cfg.correct_cls_mask=true`); the shipped weights use the legacy one.
It starts from configs/shapes.py's default (the schema's keys), so every mmjax command
and override works; data stays the `shapes` datasets for fine-tuning demos, tokenised with
open_clip's BPE (read from the installed open_clip package) at 224 px.
"""
import ml_collections

from configs import shapes

# open_clip model_configs/*.json (`openclip_model_config` rebuilds them; a test checks them
# against the installed open_clip). Both towers' MLPs are 4x wide, the multimodal decoder
# has the text side's width, heads and layers. coca_tiny: a seconds-long model for tests.
VARIANTS = {
    "coca_vit_b32": dict(image_size=224, patch_size=32, embed_dim=512, pooler_heads=8,
                         vision=dict(width=768, depth=12, num_heads=12),
                         text=dict(width=512, num_heads=8, layers=12), context_length=76,
                         queries=256, quick_gelu=False),
    "coca_vit_l14": dict(image_size=224, patch_size=14, embed_dim=768, pooler_heads=8,
                         vision=dict(width=1024, depth=24, num_heads=16),
                         text=dict(width=768, num_heads=12, layers=12), context_length=76,
                         queries=256, quick_gelu=False),
    "coca_tiny": dict(image_size=32, patch_size=8, embed_dim=32, pooler_heads=4,
                      vision=dict(width=64, depth=2, num_heads=4),
                      text=dict(width=32, num_heads=4, layers=2), context_length=16,
                      queries=8, quick_gelu=True),
}
OPENCLIP_VOCAB_SIZE = 49408


def torch_clip_conventions(c: ml_collections.ConfigDict) -> None:
  """What every CLIP-family checkpoint from PyTorch (open_clip, OpenAI) shares: torch's
  LayerNorm epsilon, CLIP's pixel normalisation, the logit scale's 1/0.07 start and 100
  cap; and fine-tuning optimizer settings (the weights are trained already)."""
  m = c.model
  m.norm_eps = 1e-5  # torch.nn.LayerNorm's default
  m.image_norm = "clip"
  m.logit_scale_init = 1 / 0.07
  m.logit_scale_max = 100.0
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.1


def openclip_model_config(variant: str) -> dict:
  """The open_clip model config dict (model_configs/*.json format) of `variant`; register
  it with `open_clip.factory._MODEL_CONFIGS[name] = ...` to build the torch model."""
  v = VARIANTS[variant]
  text = dict(context_length=v["context_length"], vocab_size=OPENCLIP_VOCAB_SIZE,
              width=v["text"]["width"], heads=v["text"]["num_heads"],
              layers=v["text"]["layers"])
  out = dict(
      embed_dim=v["embed_dim"],
      vision_cfg=dict(image_size=v["image_size"], layers=v["vision"]["depth"],
                      width=v["vision"]["width"], patch_size=v["patch_size"],
                      attentional_pool=True, attn_pooler_heads=v["pooler_heads"],
                      output_tokens=True),
      text_cfg=dict(text, embed_cls=True, output_tokens=True),
      multimodal_cfg=dict(text, attn_pooler_heads=v["text"]["num_heads"]),
      custom_text=True)
  if v["queries"] != 256:
    out["vision_cfg"]["attn_pooler_queries"] = v["queries"]
  if v["quick_gelu"]:
    out["quick_gelu"] = True
  if v["vision"]["width"] // v["vision"]["num_heads"] != 64:
    # open_clip derives vision heads as width // head_width (default 64).
    out["vision_cfg"]["head_width"] = v["vision"]["width"] // v["vision"]["num_heads"]
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, *options = (arg or "coca_vit_b32").split(",")
  if variant not in VARIANTS:
    raise ValueError(f"configs/openclip.py:{arg}: choose one of {tuple(VARIANTS)}")
  opts = dict(o.split("=", 1) for o in options)
  if set(opts) - {"legacy_mask"}:
    raise ValueError(f"configs/openclip.py:{arg}: the only option is legacy_mask=0|1")
  legacy_mask = opts.get("legacy_mask", "1") == "1"  # an argument string, not a config key
  v = VARIANTS[variant]

  c = shapes.get_config("coca_unicl_prefix")
  c.unlock()
  c.name = f"openclip:{arg or variant}"
  c.batch_size = 32
  c.total_steps = 200
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.eval_every_steps = 100
  c.data.image_size = v["image_size"]
  # open_clip feeds the text tower context_length tokens and its decoder those minus the
  # last; mmjax reads text[:, :-1] for both, so context_length + 1 reproduces both towers
  # (text features: identical; caption logits: open_clip's plus one more position).
  c.data.max_text_len = v["context_length"] + 1
  c.data.tokenizer.kind = "openclip"  # BPE of the installed open_clip package
  c.data.tokenizer.vocab_size = OPENCLIP_VOCAB_SIZE
  c.eval_batch_size = 64

  m = c.model
  m.patch_size = v["patch_size"]
  width = v["vision"]["width"]
  m.vision.update(width=width, depth=v["vision"]["depth"], mlp_dim=4 * width,
                  num_heads=v["vision"]["num_heads"])
  # open_clip's ViT: bias-free patch conv, class token, ln_pre, and (CoCa) no final norm.
  m.vision.patch_bias = False
  m.vision.class_token = True
  m.vision.ln_pre = True
  m.vision.ln_post = False
  tw = v["text"]["width"]
  m.text.update(width=tw, num_uni_layers=v["text"]["layers"],
                num_multi_layers=v["text"]["layers"], mlp_dim=4 * tw,
                num_heads=v["text"]["num_heads"])
  m.text.cls_mask = "legacy" if legacy_mask else "correct"
  m.text.multimodal_block = "openclip"
  m.embed_dim = v["embed_dim"]
  m.pooler = "openclip"
  m.pooler_heads = v["pooler_heads"]  # vision_cfg.attn_pooler_heads
  m.num_caption_queries = v["queries"] - 1  # query 0 is the contrastive embedding
  m.tie_embeddings = False
  m.prefix_length = 0  # open_clip has no prefix conditioning
  # nn.GELU (exact) unless the open_clip config sets quick_gelu (the CoCa ones do not).
  m.activation = "quick_gelu" if v["quick_gelu"] else "gelu"
  torch_clip_conventions(c)
  if variant == "coca_tiny":
    c.batch_size = 8
    c.total_steps = 4
    c.log_every_steps = c.checkpoint_every_steps = c.eval_every_steps = 2
    c.eval_batch_size = 16
    c.evals.retrieval.num_examples = c.evals.zeroshot.num_examples = 32
    c.evals.linear_probe.update(num_train=128, num_examples=32)
  c.lock()
  return c
