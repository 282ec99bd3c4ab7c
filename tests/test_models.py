"""CoCa model: image normalisation, layouts, masking, prefix conditioning, mixed precision."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mmjax import errors, losses, models, runtime
from mmjax.models import layers
from mmjax.models import text as text_lib
from mmjax.models import vit


# Compiles dominate on CPU: init and apply are jitted, and cached per model.
_APPLY = {}


def init(config, batch):
  model = models.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), batch["image"], batch["text"],
                               batch["text_type"])["params"]
  return model, flax.linen.unbox(params)


def apply(model, params, batch):
  if model not in _APPLY:
    _APPLY[model] = jax.jit(lambda p, b: model.apply({"params": p}, b["image"], b["text"],
                                                     b["text_type"]))
  return jax.device_get(_APPLY[model](params, batch))


def float_pixels(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] as the data pipeline computed it on the host before images
  travelled as uint8: NumPy float32, x * (2/255) - 1."""
  return np.asarray(images, np.float32) * (2.0 / 255.0) - 1.0


def test_normalize_images_maps_every_pixel_value_as_the_host_did():
  pixels = np.arange(256, dtype=np.uint8).reshape(4, 4, 16)
  reference = pixels.astype(np.float64) * (2 / 255) - 1  # float64, then compared in float32
  for fn in (vit.normalize_images, jax.jit(vit.normalize_images)):  # eager and fused
    out = np.asarray(fn(pixels))
    assert out.dtype == np.float32 and out.shape == pixels.shape
    # float32(2/255) is off by <= 2**-31 (x 255) and two roundings add <= 2 * 2**-25.
    np.testing.assert_allclose(out, reference, rtol=0, atol=255 * 2.0 ** -31 + 2.0 ** -24)
    assert out.min() == -1 and out.max() == 1
    np.testing.assert_array_equal(out, float_pixels(pixels))  # bit for bit
  bf16 = jax.jit(vit.normalize_images, static_argnums=1)(pixels, jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(bf16), float_pixels(pixels).astype(jnp.bfloat16))


def test_normalize_images_takes_floats_as_they_are_and_refuses_other_types():
  floats = np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(vit.normalize_images(floats)), floats)
  np.testing.assert_array_equal(np.asarray(vit.normalize_images(floats, jnp.bfloat16)),
                                floats.astype(jnp.bfloat16))
  with pytest.raises(TypeError, match="int32"):
    vit.normalize_images(np.zeros((1, 4, 4, 3), np.int32))


@pytest.mark.parametrize("overrides,tolerance", [({}, 0), ({"model.dtype": "bfloat16"}, 0),
                                                 ({"model.image_norm": "clip"}, 1e-5)])
def test_uint8_images_give_the_outputs_of_their_float_pixels(overrides, tolerance):
  """The model's image entry normalises uint8 exactly as the host did: the same outputs bit
  for bit. With CLIP's normalisation, XLA folds ((x * 2/255 - 1) + 1) / 2 on uint8 x into
  (x * 2/255) / 2 (it reassociates the constants), one rounding fewer than from floats:
  outputs agree to float32 precision, not bit for bit."""
  config = helpers.tiny_config(**overrides)
  batch = helpers.synthetic_batch(config)
  assert batch["image"].dtype == np.uint8
  model, params = init(config, batch)
  out = apply(model, params, batch)
  reference = apply(model, params, {**batch, "image": float_pixels(batch["image"])})
  for key in out:
    np.testing.assert_allclose(out[key], reference[key], rtol=tolerance, atol=tolerance,
                               err_msg=key)


def test_scanned_and_unrolled_layouts_give_equal_outputs_and_gradients():
  """Also the gradients: scanned, remat_policy "none" keeps matmul outputs and recomputes
  the elementwise rest (layers.SCANNED_NONE_POLICY); unrolled recomputes nothing."""
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  unrolled_config = helpers.tiny_config(**{"model.scan_layers": False})
  unrolled = models.build_model(unrolled_config)
  out_scan = apply(model, params, batch)
  out_unrolled = apply(unrolled, layers.unstack_layer_params(params), batch)
  for key in out_scan:
    np.testing.assert_allclose(out_scan[key], out_unrolled[key], rtol=1e-5, atol=1e-5)

  def grads(m, p):
    loss = lambda p: (m.apply({"params": p}, batch["image"], batch["text"],
                              batch["text_type"])["caption_logits"] ** 2).mean()
    return jax.device_get(jax.jit(jax.grad(loss))(p))

  scanned = layers.unstack_layer_params(grads(model, params))
  reference = grads(unrolled, layers.unstack_layer_params(params))
  scale = max(np.abs(g).max() for g in jax.tree.leaves(reference))
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(scanned),
                            jax.tree.leaves(reference)):
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("policy", sorted(layers.REMAT_POLICIES))
def test_remat_policy_does_not_change_loss_or_gradients(policy):
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  remat = models.build_model(helpers.tiny_config(**{"model.remat_policy": policy}))

  def loss_and_grads(m):
    loss = lambda p: (m.apply({"params": p}, batch["image"], batch["text"],
                              batch["text_type"])["caption_logits"] ** 2).mean()
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))

  if model not in _REMAT_REFERENCE:
    _REMAT_REFERENCE[model] = loss_and_grads(model)
  ref_loss, ref_grads = _REMAT_REFERENCE[model]
  loss, grads = loss_and_grads(remat)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  # Rematerialisation reorders float work: equal up to rounding, relative to the whole
  # gradient (some entries, e.g. attention key biases, are zero up to float noise).
  scale = max(np.abs(ref).max() for ref in jax.tree.leaves(ref_grads))
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


_REMAT_REFERENCE = {}


def _stack_temp_bytes(policy: str) -> int:
  """Compiled temporary bytes of the gradient of a 4-layer scanned causal stack."""
  stack = layers.TransformerStack(num_layers=4, num_heads=4, mlp_dim=256, causal=True,
                                  stack=layers.Stack(remat_policy=policy))
  x = jax.ShapeDtypeStruct((8, 64, 64), jnp.float32)
  params = flax.linen.unbox(jax.eval_shape(stack.init, jax.random.key(0), x)["params"])
  grad = jax.jit(jax.grad(lambda p, x: stack.apply({"params": p}, x).sum()))
  return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_named_remat_policies_keep_what_they_name():
  """The checkpoint_name tags reach the policies: keeping q, k, v costs more than keeping
  nothing, keeping the whole attention branch more again, and less than no remat.

  On CPU the offload policies keep the same activations in the same memory: XLA's CPU
  backend has one memory space, and JAX lowers the device -> pinned_host transfers to
  nothing there, so `offload_X` compiles to `save_X` (the same temporaries). On TPU and GPU
  the saved activations live in host memory instead."""
  temp = {p: _stack_temp_bytes(p) for p in ("full", "save_qkv_proj",
                                            "save_attention_recompute_mlp",
                                            "offload_attention_recompute_mlp", "dots")}
  assert (temp["full"] < temp["save_qkv_proj"] < temp["save_attention_recompute_mlp"]
          < temp["dots"]), temp
  assert temp["offload_attention_recompute_mlp"] == temp["save_attention_recompute_mlp"]


def test_scanned_none_stacks_only_matmul_outputs(monkeypatch):
  """Scanned "none" is the "dots" policy; saving every residual (no remat, as before)
  stacks far more per layer."""
  assert _stack_temp_bytes("none") == _stack_temp_bytes("dots")
  monkeypatch.setattr(layers, "SCANNED_NONE_POLICY", "none")
  assert _stack_temp_bytes("none") > 1.5 * _stack_temp_bytes("dots")


def test_captioning_is_causal():
  """Logits at position t do not depend on tokens after t."""
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  changed = {**batch, "text": batch["text"].copy()}
  changed["text"][:, 6:] = 5  # real (non-pad) tokens from position 6 on
  a = apply(model, params, batch)["caption_logits"]
  b = apply(model, params, changed)["caption_logits"]
  np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
  assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_cls_sees_every_real_token_and_no_padding():
  valid = jnp.array([[True, True, False, False, True]])  # 2 tokens, 2 pads, CLS slot
  mask = np.asarray(text_lib.unimodal_mask(valid))[0, 0]
  np.testing.assert_array_equal(mask[-1], [True, True, False, False, True])
  np.testing.assert_array_equal(mask[1], [True, True, False, False, False])
  # Model level: the text embedding depends on the last real token.
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  changed = {**batch, "text": batch["text"].copy()}
  last_real = (batch["text"] != 0).sum(1) - 2  # the token before EOS
  changed["text"][np.arange(len(last_real)), last_real] = 7
  moved = np.abs(apply(model, params, batch)["text_emb"]
                 - apply(model, params, changed)["text_emb"]).max(1)
  assert (moved > 1e-4).all()


def test_prefix_conditioning_switches_text_embedding_by_type():
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  flipped = {**batch, "text_type": 1 - batch["text_type"]}
  moved = np.abs(apply(model, params, batch)["text_emb"]
                 - apply(model, params, flipped)["text_emb"]).max(1)
  assert (moved > 1e-4).all()
  no_prefix = helpers.tiny_config(**{"model.prefix_length": 0})
  model, params = init(no_prefix, batch)
  np.testing.assert_allclose(apply(model, params, batch)["text_emb"],
                             apply(model, params, flipped)["text_emb"], atol=1e-6)


@pytest.mark.parametrize("pooler", ["cascade", "parallel"])
def test_poolers_and_output_shapes(pooler):  # parallel: contrastive pooler reads ViT tokens
  config = helpers.tiny_config(**{"model.pooler": pooler})
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  out = apply(model, params, batch)
  b, length = batch["text"].shape
  assert out["image_emb"].shape == (b, config.model.embed_dim)
  assert out["text_emb"].shape == (b, config.model.embed_dim)
  assert out["caption_logits"].shape == (b, length - 1, config.model.text.vocab_size)
  assert out["caption_logits"].dtype == jnp.float32
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)


def test_image_features_are_the_contrastive_pooling_before_the_projection():
  """Linear probes read `image_features`: projected by image_proj they give exactly the
  contrastive embedding, and they are the model's pooled vector (not the embedding)."""
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  features, projected, embedding = jax.device_get(jax.jit(lambda p, x: model.apply(
      {"params": p}, x,
      method=lambda m, x: (m.image_features(x), m.image_proj(m.image_features(x)),
                           m.encode_image(x)[0])))(params, batch["image"]))
  assert features.shape == (config.batch_size, config.model.text.width)
  assert features.dtype == np.float32
  np.testing.assert_allclose(projected, embedding, rtol=1e-5, atol=1e-6)
  assert config.model.embed_dim != config.model.text.width  # really a different vector


def test_tied_embeddings_drop_the_output_projection():
  config = helpers.tiny_config(**{"model.tie_embeddings": True})
  batch = helpers.synthetic_batch(config)
  _, params = init(config, batch)
  assert "lm_head" not in params
  _, untied = init(helpers.tiny_config(), batch)
  count = lambda p: sum(x.size for x in jax.tree.leaves(p))
  assert count(untied) - count(params) == (config.model.text.vocab_size
                                           * config.model.text.width)


def test_bfloat16_loss_close_to_float32():
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model, params = init(config, batch)
  bf16 = models.build_model(helpers.tiny_config(**{"model.dtype": "bfloat16"}))

  @jax.jit
  def objective(out, batch):
    mask = (batch["text"][:, 1:] != 0).astype(np.float32)
    return (losses.unicl_loss(out["image_emb"], out["text_emb"], batch["label"],
                              out["logit_scale"])
            + 2 * losses.token_ce(out["caption_logits"], batch["text"][:, 1:], mask)[0])

  loss = lambda m: objective(apply(m, params, batch), batch)

  f32, b16 = float(loss(model)), float(loss(bf16))
  assert abs(b16 - f32) / f32 < 2e-2
  assert f32 != b16  # bf16 really ran in bf16


@pytest.mark.parametrize("make_config", [
    lambda: helpers.tiny_config(),
    lambda: helpers.tiny_config(**{"model.pooler": "openclip", "model.embed_dim": 32,
                                   "model.text.multimodal_block": "openclip"}),
    lambda: helpers.flava_config()], ids=["coca", "coca_openclip_layout", "flava"])
def test_attention_impl_reaches_every_attention_call(monkeypatch, make_config):
  """model.attention_impl is passed to every jax.nn.dot_product_attention of the forward
  pass (the ViT, both poolers, both decoders / FLAVA's encoders). cuDNN needs a GPU, so the
  spy records the argument and computes with XLA; every shape counts as cuDNN's here."""
  xla_attention = jax.nn.dot_product_attention
  seen = []

  def spy(*args, implementation=None, **kwargs):
    seen.append(implementation)
    return xla_attention(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  monkeypatch.setattr(layers, "cudnn_supports", lambda q, k: True)  # tested below
  config = helpers.override(make_config(), **{"model.attention_impl": "cudnn",
                                              "model.scan_layers": False})
  model = models.build_model(config)
  batch = (helpers.flava_batch if config.model.name == "flava" else helpers.synthetic_batch)(
      config)
  inputs = batch["image"], batch["text"], batch["text_type"]
  jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *inputs))
  assert seen and set(seen) == {"cudnn"}, seen
  seen.clear()
  config = helpers.override(config, **{"model.attention_impl": "xla"})
  model = models.build_model(config)
  jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *inputs))
  assert seen and set(seen) == {"xla"}, seen


def test_cudnn_attention_off_gpu_is_one_config_error():
  config = helpers.tiny_config(**{"model.attention_impl": "cudnn", "model.dtype": "bfloat16"})
  with pytest.raises(errors.ConfigError, match=r"^config model.attention_impl='cudnn' runs "
                     r"only on NVIDIA GPUs, these devices are 'cpu': use "
                     r"--config.model.attention_impl=xla$"):
    runtime.build(config, jax.devices()[:1])


@pytest.mark.parametrize("dtype, t, s, head_dim, expected", [
    (jnp.bfloat16, 256, 256, 64, True),  # CoCa-Base ViT, captioning pooler
    (jnp.float16, 64, 64, 88, True),  # CoCa-Giant's head dim 1408 / 16
    (jnp.bfloat16, 1, 256, 64, False),  # the 1-query contrastive pooler
    (jnp.bfloat16, 63, 256, 64, False),  # a 63-token multimodal decoder's cross-attention
    (jnp.bfloat16, 64, 63, 64, False),
    (jnp.float32, 256, 256, 64, False),
    (jnp.bfloat16, 256, 256, 100, False),
    (jnp.bfloat16, 256, 256, 136, False),
])
def test_cudnn_supports_only_shapes_cudnn_trains(dtype, t, s, head_dim, expected):
  q = jax.ShapeDtypeStruct((2, t, 4, head_dim), dtype)
  k = jax.ShapeDtypeStruct((2, s, 4, head_dim), dtype)
  assert layers.cudnn_supports(q, k) is expected
