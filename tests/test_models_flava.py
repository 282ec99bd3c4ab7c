"""The FLAVA model (mmjax.models.flava): the image encoder is the shared ViT with a mask
token, and the features the probe and the contrastive embedding read."""
import jax
import numpy as np
import pytest

import helpers
from mmjax import models
from mmjax.models import vit
from mmjax.models.flava import FlavaConfig


def test_image_encoder_is_the_shared_vit_with_a_mask_token():
  config = helpers.flava_config(batch_size=4)
  model = models.build_model(config)
  params = helpers.init_params(config, model)
  assert sorted(params["vision"]) == ["cls", "encoder", "ln_post", "mask_token",
                                      "patch_embed", "pos_embed"]
  # Token table rows (vocab + [MASK]) padded so the `vocab` axis splits over tensor devices.
  rows = params["token_embed"]["embedding"].shape[0]
  assert rows % 128 == 0 and rows >= config.model.text.vocab_size + 1
  n, size = FlavaConfig.from_config(config).num_patches, config.data.image_size
  rng = np.random.default_rng(4)
  images = rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
  other = rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
  run = jax.jit(lambda p, x, m: model.apply(
      {"params": p}, x, m,
      method=lambda f, x, m: (f.image_tokens(x, m), f.image_tokens(x), f.image_features(x),
                              f.image_proj(f.image_features(x)), f.encode_image(x)[0])))
  none, every = np.zeros((4, n), bool), np.ones((4, n), bool)
  masked_none, unmasked, features, projected, embedding = jax.device_get(
      run(params, images, none))
  other_none = jax.device_get(run(params, other, none))[0]
  masked_all = jax.device_get(run(params, images, every))[0]
  other_all = jax.device_get(run(params, other, every))[0]
  # An all-False mask is the plain encoder; different images give different tokens ...
  np.testing.assert_array_equal(masked_none, unmasked)
  assert np.abs(masked_none - other_none).max() > 1e-2
  # ... but with every patch replaced by the mask token the image no longer matters.
  np.testing.assert_allclose(masked_all, other_all, atol=1e-6)
  # Probe features: the image encoder's CLS output, which image_proj maps to the embedding.
  assert features.shape == (4, config.model.vision.width) and features.dtype == np.float32
  np.testing.assert_array_equal(features, unmasked[:, 0])
  np.testing.assert_allclose(projected, embedding, rtol=1e-5, atol=1e-6)
  # A ViT built without a mask token refuses a mask (CoCa's parameter tree is unchanged).
  with pytest.raises(ValueError, match="mask_token=True"):
    vit.ViT(config.model.patch_size, 8, 1, 16, 2).init(jax.random.key(0), images[:1],
                                                        none[:1])
