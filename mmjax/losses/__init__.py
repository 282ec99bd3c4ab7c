"""Loss building blocks, by family; the objectives (`mmjax.objectives`) weigh and combine
them:
  contrastive.py  UniCL (label-aware contrastive, CLIP as a special case) and SigLIP, dense
                  and ring-sharded (memory-linear under `jax.shard_map`); FLAVA's masked UniCL
  tokens.py       token cross-entropy (captioning, MLM), patch regression, binary matching
  caption.py      the captioning head fused with its cross-entropy in token chunks, never
                  holding the [B, T, V] logits

`from mmjax import losses; losses.unicl_loss(...)` reaches each family's public functions.
"""
from mmjax.losses.caption import fused_caption_loss
from mmjax.losses.contrastive import (l2_normalize, masked_contrastive_loss, positive_mask,
                                      siglip_loss, siglip_loss_dense, unicl_loss,
                                      unicl_loss_dense)
from mmjax.losses.tokens import itm_bce, patch_mse, token_ce

__all__ = ["fused_caption_loss", "itm_bce", "l2_normalize", "masked_contrastive_loss",
           "patch_mse", "positive_mask", "siglip_loss", "siglip_loss_dense", "token_ce",
           "unicl_loss", "unicl_loss_dense"]
