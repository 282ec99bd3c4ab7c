"""The SigLIP objective (mmjax.objectives.siglip): chosen by config, wired to the sigmoid loss
with the model's learned scale and bias, exact under gradient accumulation and sharding.
The loss itself is tested against float64 NumPy in tests/test_losses_contrastive.py."""
import jax
import numpy as np
import pytest

import helpers
from helpers import assert_trees_close, loss_and_grads
from mmjax import cli, losses, objectives, optimizer
from mmjax.objectives.siglip import SiglipObjective


@pytest.fixture(scope="module")
def reference():
  return loss_and_grads((1, 1, 1), "siglip")


def scale_and_bias(grads) -> np.ndarray:
  return np.array([grads["logit_scale"], grads["logit_bias"]])


@pytest.mark.parametrize("label_aware", [True, False])
def test_config_selects_the_sigmoid_loss_on_the_models_scale_and_bias(label_aware):
  config = helpers.tiny_config("siglip", **{"loss.label_aware": label_aware})
  rt, state = helpers.step_setup(config, 1)
  assert isinstance(rt.objective, SiglipObjective)
  batch = helpers.synthetic_batch(config)
  assert (batch["label"] == -1).any() and len(set(batch["label"][batch["label"] >= 0])) < (
      batch["label"] >= 0).sum()  # captions and duplicate classes
  with rt.activate():
    loss, metrics = jax.jit(rt.objective.loss)(state.params, batch)
    out = rt.model.apply({"params": state.params}, batch["image"], batch["text"],
                         batch["text_type"], with_captions=False)
  assert (float(out["logit_scale"]), float(out["logit_bias"])) == pytest.approx((10.0, -10.0))
  labels = batch["label"] if label_aware else np.full_like(batch["label"], -1)
  want = losses.siglip_loss_dense(out["image_emb"], out["text_emb"], labels,
                                  out["logit_scale"], out["logit_bias"])
  assert float(metrics["contrastive_loss"]) == pytest.approx(float(want), rel=1e-5)
  assert float(loss) == pytest.approx(float(want), rel=1e-5)  # caption_weight = 0
  assert float(metrics["logit_bias"]) == pytest.approx(-10.0)


def test_any_coca_config_can_switch_to_siglip():
  config = helpers.tiny_config("unicl", **{"loss.name": "siglip", "model.logit_bias": True})
  cli.validate(config, num_devices=1)
  assert isinstance(objectives.build(config, None, mesh=None), SiglipObjective)


def test_logit_bias_is_not_weight_decayed(reference):
  _, grads, _ = reference
  mask = optimizer.decay_mask(grads)
  assert not mask["logit_bias"] and not mask["logit_scale"]
  assert mask["image_proj"]["dense"]["kernel"]  # the mask does decay kernels


def test_gradient_accumulation_is_exact_for_embeddings_scale_and_bias(reference):
  ref_loss, ref_grads, _ = reference
  assert np.all(np.abs(scale_and_bias(ref_grads)) > 1e-4)  # both are exercised
  loss, grads, _ = loss_and_grads((1, 1, 1), "siglip", grad_accum_steps=4)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)
  np.testing.assert_allclose(scale_and_bias(grads), scale_and_bias(ref_grads), rtol=1e-5)


@pytest.mark.parametrize("mesh_shape, accum", [((2, 2, 2), 1), ((4, 2, 1), 2)])
def test_sharded_step_matches_one_device(reference, mesh_shape, accum):
  ref_loss, ref_grads, _ = reference
  loss, grads, _ = loss_and_grads(mesh_shape, "siglip", grad_accum_steps=accum)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_trees_close(grads, ref_grads, rtol=1e-5)
  np.testing.assert_allclose(scale_and_bias(grads), scale_and_bias(ref_grads), rtol=1e-5)
