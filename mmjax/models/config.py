"""The model-config fields every mmjax model shares, read once from an ml_collections config.

`CoCaConfig` and `FlavaConfig` are frozen dataclasses (Flax hashes them) that extend
`ModelConfig` with their own fields; `ModelConfig.shared_fields(config)` reads the shared
ones (config keys in the comments), so each model's `from_config` only adds its own.
"""
import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """ViT image encoder, text width / MLP / heads / vocabulary, contrastive embedding,
  precision and layer layout."""
  image_size: int  # model.image_size
  patch_size: int  # model.patch_size
  vision_width: int  # model.vision.width
  vision_depth: int  # model.vision.depth
  vision_mlp_dim: int  # model.vision.mlp_dim
  vision_heads: int  # model.vision.num_heads
  text_width: int  # model.text.width
  text_mlp_dim: int  # model.text.mlp_dim
  text_heads: int  # model.text.num_heads
  vocab_size: int  # model.text.vocab_size (tokenizer ids)
  max_text_len: int  # data.max_text_len: tokens per example incl. BOS/EOS
  embed_dim: int  # model.embed_dim: the shared image-text embedding
  logit_scale_init: float  # model.logit_scale_init
  logit_scale_max: float  # model.logit_scale_max
  activation: str  # model.activation (default "gelu")
  dtype: str  # model.dtype
  param_dtype: str  # model.param_dtype
  scan_layers: bool  # model.scan_layers
  remat_policy: str  # model.remat_policy
  attention_impl: str  # model.attention_impl

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @staticmethod
  def shared_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields above, read from `config` (keyword arguments for a subclass)."""
    m = config.model
    return dict(
        image_size=m.image_size, patch_size=m.patch_size, vision_width=m.vision.width,
        vision_depth=m.vision.depth, vision_mlp_dim=m.vision.mlp_dim,
        vision_heads=m.vision.num_heads, text_width=m.text.width,
        text_mlp_dim=m.text.mlp_dim, text_heads=m.text.num_heads,
        vocab_size=m.text.vocab_size, max_text_len=config.data.max_text_len,
        embed_dim=m.embed_dim, logit_scale_init=m.logit_scale_init,
        logit_scale_max=m.logit_scale_max, activation=m.activation,
        dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
        remat_policy=m.remat_policy, attention_impl=m.attention_impl)
