"""The jitted train step: sharded == unsharded, exact gradient accumulation, NaN guard."""
import math

import jax
import numpy as np
import pytest

import helpers
from mmjax import hlo, train
from mmjax.models import coca as coca_model
from mmjax.objectives import coca as coca_objective
from helpers import assert_trees_close, loss_and_grads


def setup(mesh_shape=(1, 1, 1), preset="coca_unicl_prefix", **overrides):
  config = helpers.tiny_config(preset, **{"mesh.shape": mesh_shape, **overrides})
  return (config, *helpers.step_setup(config, math.prod(mesh_shape)))


@pytest.fixture(scope="module")
def reference():
  return loss_and_grads((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_matches_one_device(reference, mesh_shape):
  ref_loss, ref_grads, _ = reference
  loss, grads, state = loss_and_grads(mesh_shape)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)
  # Per-device parameter + optimizer bytes shrink as the shardings predict.
  data, fsdp, tensor = mesh_shape
  leaves = jax.tree.leaves((state.params, state.opt_state))
  total = sum(x.nbytes for x in leaves)
  device0 = jax.devices()[0]
  on_device0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                   if s.device == device0)
  predicted = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  assert on_device0 == predicted
  if fsdp * tensor == 1:
    assert on_device0 == total  # pure data parallelism replicates the state
  else:  # all but small vectors are split over fsdp x tensor
    assert on_device0 < total / (fsdp * tensor) * 1.3


def test_gradient_accumulation_is_exact(reference):
  ref_loss, ref_grads, _ = reference
  loss, grads, _ = loss_and_grads((1, 1, 1), grad_accum_steps=4)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_gradient_accumulation_sharded_is_exact(reference):
  ref_loss, ref_grads, _ = reference
  loss, grads, _ = loss_and_grads((2, 2, 1), grad_accum_steps=2)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


@pytest.mark.parametrize("preset", ["coca_accumulated", "flava"])
def test_uint8_images_train_exactly_as_their_float_pixels(preset):
  """Loss, metrics and gradients of one step fed the pipeline's uint8 images equal those of
  the same images as float32 in [-1, 1] (the host's conversion before: NumPy float32
  x * (2/255) - 1), bit for bit: the model normalises on the device, per micro-batch
  (CoCa: 2 micro-batches over a 2-device data mesh; FLAVA: its MIM targets too)."""
  if preset == "flava":
    config = helpers.flava_config(batch_size=8, **{"mesh.shape": (1, 1, 1)})
    pixels = helpers.flava_batch(config)
  else:
    config = helpers.tiny_config(**{"mesh.shape": (2, 1, 1), "grad_accum_steps": 2})
    pixels = helpers.synthetic_batch(config)
  assert pixels["image"].dtype == np.uint8
  floats = {**pixels, "image": pixels["image"].astype(np.float32) * (2.0 / 255.0) - 1.0}
  loss, aux, grads, _ = helpers.objective_grads(config, pixels)
  ref_loss, ref_aux, ref_grads, _ = helpers.objective_grads(config, floats)
  assert loss == ref_loss and np.isfinite(loss)
  assert_trees_close(aux, ref_aux, rtol=0)
  assert_trees_close(grads, ref_grads, rtol=0)


def test_microbatch_j_is_rows_j_j_plus_k_and_merging_restores_the_order():
  x = np.arange(12 * 2).reshape(12, 2)
  micro = coca_objective.interleave_microbatches(x, 3)
  parts = [np.asarray(coca_objective.microbatch(micro, j)) for j in range(3)]
  for j, part in enumerate(parts):
    np.testing.assert_array_equal(part, x[j::3])
  np.testing.assert_array_equal(coca_objective.merge_microbatches(np.stack(parts)), x)
  with pytest.raises(ValueError, match="grad_accum_steps=5"):
    coca_objective.interleave_microbatches(x, 5)


def test_accumulation_reads_each_microbatch_in_place():
  """The compiled step (2 devices, 4 micro-batches) holds the images only as the batch
  argument: no copy, transpose or other batch-sized uint8 value (slicing micro-batches of
  a stacked [k, B/k, ...] transpose made XLA copy the whole batch)."""
  config = helpers.tiny_config(**{"mesh.shape": (2, 1, 1), "grad_accum_steps": 4})
  rt = helpers.runtime.build(config, jax.devices()[:2])
  computations, _ = hlo.parse_module(rt.lower_train_step().compile().as_text())
  size = config.data.image_size
  shard = config.batch_size // 2 * size * size * 3
  whole_batch = [(i.opcode, i.shape) for body in computations.values() for i in body
                 if i.shape.startswith("u8[") and math.prod(hlo.shape_dims(i.shape)) == shard]
  assert whole_batch and {op for op, _ in whole_batch} <= {"parameter", "bitcast",
                                                            "get-tuple-element"}, whole_batch


# What gradient caching's no-gradient pass computes: encode_image and encode_text_tokens.
EMBEDDING_PARTS = ("patch_embedding", "vision_blocks", "caption_pooler", "contrastive_pooler",
                   "unimodal", "projections")


def test_accumulation_embeds_all_but_the_last_microbatch_without_gradients():
  """The last micro-batch's forward is kept (its residuals) for its backward, so the
  embedding pass runs k-1 micro-batches: 4 micro-batches add three quarters of the batch's
  embedding forward to the matmul FLOPs of the one-step program (embedding every
  micro-batch added all of it)."""
  flops = {}
  for k in (1, 4):
    config = helpers.tiny_config(**{"grad_accum_steps": k})
    rt = helpers.runtime.build(config, jax.devices()[:1])
    flops[k] = hlo.analyze(rt.lower_train_step().compile().as_text()).matmul_flops
  parts = coca_model.forward_flops(config)
  embedding_pass = sum(parts[p] for p in EMBEDDING_PARTS) * config.batch_size
  assert flops[4] - flops[1] == pytest.approx(0.75 * embedding_pass, rel=0.03)


def test_accumulation_holds_one_microbatch_of_activations():
  """Temporaries of the compiled step shrink with the micro-batch: 2 micro-batches of 128
  need at most 60% of one 256-example step's (keeping the last forward for k = 2 let XLA
  overlap both micro-batches: 85%), 4 of 64 at most 30%."""
  temp = {}
  for k in (1, 2, 4):
    config = helpers.tiny_config(**{"grad_accum_steps": k, "batch_size": 256})
    rt = helpers.runtime.build(config, jax.devices()[:1])
    temp[k] = rt.lower_train_step().compile().memory_analysis().temp_size_in_bytes
  assert temp[2] <= 0.6 * temp[1] and temp[4] <= 0.3 * temp[1], temp


def test_nonfinite_batch_is_skipped_and_counted():
  config, rt, state = setup()
  before = jax.device_get(state.params)
  with rt.activate():
    step = rt.jit_train_step()
    bad = next(train.poison_batches(iter([helpers.synthetic_batch(config)]), 0, 1))
    state, metrics = step(state, rt.global_batch(bad))
    assert not bool(metrics["finite"]) and int(metrics["nonfinite_steps"]) == 1
    assert_trees_close(jax.device_get(state.params), before, rtol=0)
    state, metrics = step(state, rt.global_batch(helpers.synthetic_batch(config)))
    assert bool(metrics["finite"]) and int(state.step) == 2
    assert int(metrics["nonfinite_steps"]) == 1


@pytest.mark.parametrize("mesh_shape,overrides", [
    ((1, 1, 1), {}),
    ((1, 2, 4), {}),  # vocabulary split over tensor, kernel over fsdp x tensor
    ((2, 1, 4), {"grad_accum_steps": 2}),
])
def test_fused_caption_loss_matches_plain_logits(reference, mesh_shape, overrides):
  """loss.caption_chunk_size > 0 (losses.fused_caption_loss) gives the plain path's loss and
  gradients (chunks of 3 of the 11 caption tokens: the last chunk is padded)."""
  ref_loss, ref_grads, _ = reference
  loss, grads, _ = loss_and_grads(mesh_shape, **{"loss.caption_chunk_size": 3, **overrides})
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_fused_caption_loss_tied_bfloat16_matches_plain_logits():
  """Tied head (the embedding table is the kernel) in bfloat16, vocabulary over tensor.
  Compared on the same mesh: a bf16 model's rounding differs between meshes anyway."""
  overrides = {"model.tie_embeddings": True, "model.dtype": "bfloat16"}
  ref_loss, ref_grads, _ = loss_and_grads((1, 2, 4), **overrides)
  loss, grads, _ = loss_and_grads((1, 2, 4), **{"loss.caption_chunk_size": 4, **overrides})
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-2)
