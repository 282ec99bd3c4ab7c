"""The FLAVA objective (mmjax.objectives.flava): its losses against float64 NumPy references
(each loss and the whole objective with its row rules and phase switch), masking
statistics, ITM negatives, masks as a function of seed and step, a jitted train step
through the runtime with the evaluators' embeddings, and the sharded loss against one
device. The model: tests/test_models_flava.py; its data views: tests/test_data_pipeline.py.

CPU compiles dominate: every distinct program is jitted once (losses share one program).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import flava_batch, flava_config, init_params
from mmjax import evaluators, losses, models
from mmjax.objectives import flava as fo


# --- float64 NumPy references --------------------------------------------------------------
def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_token_ce(logits, targets, weights):
  nll = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  return (nll * weights).sum() / max(weights.sum(), 1)


def np_patch_mse(pred, target, weights):
  return (((pred - target) ** 2).mean(-1) * weights).sum() / max(weights.sum(), 1)


def np_itm_bce(logit, y, weights):
  p = 1 / (1 + np.exp(-logit))
  nll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  return (nll * weights).sum() / max(weights.sum(), 1)


def np_contrastive(img, txt, labels, valid, scale):
  """Loop over the valid rows only: the sub-batch of paired examples, UniCL targets."""
  idx = np.flatnonzero(valid)
  u = img[idx] / np.linalg.norm(img[idx], axis=1, keepdims=True)
  v = txt[idx] / np.linalg.norm(txt[idx], axis=1, keepdims=True)
  lab = labels[idx]
  logits = scale * u @ v.T
  n = len(idx)
  pos = np.array([[i == j or (lab[i] >= 0 and lab[i] == lab[j]) for j in range(n)]
                  for i in range(n)], np.float64)
  def direction(lg, ps):
    total = 0.0
    for i in range(n):
      lse = np.log(np.exp(lg[i] - lg[i].max()).sum()) + lg[i].max()
      total += lse - (lg[i] * ps[i]).sum() / ps[i].sum()
    return total / n
  return 0.5 * (direction(logits, pos) + direction(logits.T, pos.T))


def np_patchify(images, p):
  b, h, w, c = images.shape
  out = np.empty((b, (h // p) * (w // p), p * p * c))
  for bi in range(b):
    k = 0
    for r in range(h // p):
      for q in range(w // p):
        out[bi, k] = images[bi, r * p:(r + 1) * p, q * p:(q + 1) * p].reshape(-1)
        k += 1
  return out


def test_losses_match_float64_numpy_references():
  rng = np.random.default_rng(0)
  b, length, vocab, n, pv, e, k = 6, 5, 11, 4, 12, 8, 7
  logits = rng.normal(size=(b, length, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (b, length)).astype(np.int32)
  tok_w = (rng.random((b, length)) < 0.4).astype(np.float32)
  pred = rng.normal(size=(b, n, pv)).astype(np.float32)
  images = rng.uniform(-1, 1, (b, 4, 4, 3)).astype(np.float32)  # patch 2 -> 4 patches of 12
  patch_w = (rng.random((b, n)) < 0.5).astype(np.float32)
  itm_logit = rng.normal(size=b).astype(np.float32) * 2
  match = rng.integers(0, 2, b).astype(np.int32)
  row_w = np.array([1, 1, 0, 1, 0, 1], np.float32)
  img = rng.normal(size=(b, e)).astype(np.float32)
  txt = rng.normal(size=(b, e)).astype(np.float32)
  labels = np.array([-1, 3, 3, -1, 2, 3], np.int32)
  valid = np.array([1, 1, 0, 1, 0, 1], bool)
  centroids = rng.uniform(-1, 1, (k, pv)).astype(np.float32)

  @jax.jit
  def all_losses(a):
    patches = fo.patchify(a["images"], 2)
    target = fo.normalized_pixels(patches)
    return dict(
        ce=losses.token_ce(a["logits"], a["targets"], a["tok_w"])[0],
        patches=patches, target=target,
        mse=losses.patch_mse(a["pred"], target, a["patch_w"])[0],
        bce=losses.itm_bce(a["itm_logit"], a["match"], a["row_w"])[0],
        contrastive=losses.masked_contrastive_loss(a["img"], a["txt"], a["labels"], a["valid"],
                                               10.0),
        contrastive_all=losses.masked_contrastive_loss(a["img"], a["txt"], a["labels"],
                                                   jnp.ones_like(a["valid"]), 10.0),
        unicl_all=losses.unicl_loss_dense(a["img"], a["txt"], a["labels"], 10.0),
        contrastive_none=losses.masked_contrastive_loss(a["img"], a["txt"], a["labels"],
                                                    jnp.zeros_like(a["valid"]), 10.0),
        grad_none=jax.grad(losses.masked_contrastive_loss)(
            a["img"], a["txt"], a["labels"], jnp.zeros_like(a["valid"]), 10.0),
        codes=fo.codebook_codes(patches, a["centroids"]))

  out = jax.device_get(all_losses(dict(
      logits=logits, targets=targets, tok_w=tok_w, pred=pred, images=images,
      patch_w=patch_w, itm_logit=itm_logit, match=match, row_w=row_w, img=img, txt=txt,
      labels=labels, valid=valid, centroids=centroids)))
  f64 = lambda x: np.asarray(x, np.float64)
  np_patches = np_patchify(f64(images), 2)
  np.testing.assert_allclose(out["patches"], np_patches, rtol=0, atol=0)
  np_target = (np_patches - np_patches.mean(-1, keepdims=True)) / np.sqrt(
      np_patches.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(out["target"], np_target, rtol=1e-5, atol=1e-5)
  assert out["ce"] == pytest.approx(np_token_ce(f64(logits), targets, f64(tok_w)), rel=1e-5)
  assert out["mse"] == pytest.approx(np_patch_mse(f64(pred), np_target, f64(patch_w)),
                                     rel=1e-5)
  assert out["bce"] == pytest.approx(np_itm_bce(f64(itm_logit), f64(match), f64(row_w)),
                                     rel=1e-5)
  assert out["contrastive"] == pytest.approx(
      np_contrastive(f64(img), f64(txt), labels, valid, 10.0), rel=1e-5)
  # All rows paired: exactly the shared UniCL loss.
  assert out["contrastive_all"] == pytest.approx(float(out["unicl_all"]), rel=1e-6)
  assert out["contrastive_all"] == pytest.approx(
      np_contrastive(f64(img), f64(txt), labels, np.ones(b, bool), 10.0), rel=1e-5)
  # No paired row (a unimodal-only batch): zero loss and finite zero gradients.
  assert out["contrastive_none"] == 0.0 and np.all(out["grad_none"] == 0.0)
  dist = ((np_patches[:, :, None, :] - f64(centroids)[None, None]) ** 2).sum(-1)
  np.testing.assert_array_equal(out["codes"], dist.argmin(-1))


def test_mlm_masking_rates():
  rng = np.random.default_rng(1)
  b, length, vocab = 512, 64, 100
  text = rng.integers(4, vocab, (b, length)).astype(np.int32)
  text[:, 0], text[:, 40] = 2, 1  # BOS, EOS
  text[:, 41:] = 0  # padding
  masked, selected = jax.device_get(
      jax.jit(lambda k, t: fo.mlm_mask(k, t, vocab, vocab, 0.15))(jax.random.key(0), text))
  regular = text >= 4
  assert not selected[~regular].any()  # never BOS/EOS/PAD
  np.testing.assert_array_equal(masked[~selected], text[~selected])
  rate = selected[regular].mean()
  n_sel = selected.sum()
  # Binomial standard errors: 0.15 over ~20k tokens -> 0.0025; 0.8 over ~3k -> 0.007.
  assert abs(rate - 0.15) < 0.01, rate
  to_mask = (masked[selected] == vocab).mean()
  kept = (masked[selected] == text[selected]).mean()  # includes random draws of the same id
  assert abs(to_mask - 0.8) < 0.03, to_mask
  assert abs(kept - (0.1 + 0.1 / (vocab - 4))) < 0.03, kept
  random = masked[selected & (masked != vocab) & (masked != text)]
  assert len(random) > 0.07 * n_sel and random.min() >= 4 and random.max() < vocab


def test_block_masking_ratio_and_blocks():
  batch, grid, ratio = 256, 14, 0.4
  mask = jax.device_get(jax.jit(lambda k: fo.block_mask(k, batch, grid, ratio, 16))(
      jax.random.key(0)))
  target = round(ratio * grid * grid)  # 78 of 196, BEiT's 75 rounds to ~40%
  assert mask.shape == (batch, grid * grid)
  np.testing.assert_array_equal(mask.sum(1), target)
  assert abs(mask.mean() - ratio) < 0.01
  # Blockiness: share of masked patches with a masked 4-neighbour; an i.i.d. 40% mask
  # gives ~1 - 0.6**4 = 0.87 at most; blocks give nearly 1, and masks differ per image.
  m = mask.reshape(batch, grid, grid)
  pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  neighbour = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
  assert (neighbour & m).sum() / m.sum() > 0.95
  assert len({row.tobytes() for row in mask}) == batch


def test_itm_negatives_never_their_own_caption():
  rng = np.random.default_rng(2)
  trials, b = 300, 16
  paired = rng.random((trials, b)) < 0.6
  paired[0] = False
  paired[1] = False
  paired[1, 3] = True  # one paired row: no negative is possible
  keys = jax.random.split(jax.random.key(0), trials)
  partner, swap = jax.device_get(jax.jit(jax.vmap(
      lambda k, p: fo.itm_negatives(k, p, 0.5)))(keys, paired))
  rows = np.arange(b)[None].repeat(trials, 0)
  assert not swap[~paired].any()
  assert not swap[:2].any()
  assert (partner[swap] != rows[swap]).all()
  assert paired[np.arange(trials)[:, None].repeat(b, 1)[swap], partner[swap]].all()
  # The partner map restricted to the paired rows is a permutation without fixed points.
  for t in range(2, trials):
    idx = np.flatnonzero(paired[t])
    if len(idx) >= 2:
      assert sorted(partner[t, idx]) == list(idx) and (partner[t, idx] != idx).all()
  multi = paired[2:].sum(1, keepdims=True) >= 2
  assert abs(swap[2:][paired[2:] & multi].mean() - 0.5) < 0.03


def test_tiny_flava_train_step_and_evaluators():
  config = flava_config(batch_size=8, **{"loss.unimodal_steps": 1,
                                        "loss.itm_negative_rate": 0.5})
  rt, state = helpers.step_setup(config, num_devices=1)
  batch = flava_batch(config)
  with rt.activate():
    train_step = rt.jit_train_step()
    history = []
    for _ in range(3):
      state, metrics = train_step(state, rt.global_batch(batch))
      history.append(jax.device_get(metrics))
    for m in history:
      for key in (*fo.LOSS_KEYS, "loss", "grad_norm"):
        assert np.isfinite(m[key]) and m[key] > 0, (key, m[key])
      assert bool(m["finite"])
    # Step 0 is the unimodal phase: the loss is MLM + MIM only; then all six.
    first, second = history[0], history[1]
    assert int(first["joint_phase"]) == 0 and int(second["joint_phase"]) == 1
    assert first["loss"] == pytest.approx(first["mlm_loss"] + first["mim_loss"], rel=1e-5)
    assert second["loss"] == pytest.approx(sum(second[k] for k in fo.LOSS_KEYS), rel=1e-5)
    assert int(state.step) == 3 and int(first["paired_examples"]) == 4

    # Zero-shot / retrieval / linear-probe use encode_image / encode_text like CoCa's.
    embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, batch_size=4)
    image_emb = embedder.images(state.params, batch["image"][:4])
    text_emb = embedder.texts(state.params, batch["text"][:4], batch["text_type"][:4])
  assert image_emb.shape == text_emb.shape == (4, config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-6)


def flava_loss_and_grads(mesh_shape):
  """The jitted FLAVA loss and gradients of one batch (joint phase, ITM swaps) on a mesh."""
  config = flava_config(batch_size=8, **{"mesh.shape": mesh_shape,
                                        "loss.itm_negative_rate": 0.5})
  loss, aux, grads, _ = helpers.objective_grads(config, flava_batch(config),
                                                jnp.int32(config.loss.unimodal_steps))
  return loss, aux, grads


@pytest.fixture(scope="module")
def one_device_reference():
  return flava_loss_and_grads((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [
    (2, 2, 2), pytest.param((4, 2, 1), marks=pytest.mark.slow)])
def test_sharded_pretrain_loss_matches_one_device(one_device_reference, mesh_shape):
  ref_loss, ref_aux, ref_grads = one_device_reference
  loss, aux, grads = flava_loss_and_grads(mesh_shape)
  assert int(aux["joint_phase"]) == 1 and int(aux["itm_negatives"]) > 0
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  for key in fo.LOSS_KEYS:
    assert aux[key] == pytest.approx(ref_aux[key], rel=1e-5, abs=1e-6), key
  helpers.assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_masks_are_a_function_of_seed_and_step():
  config = flava_config(batch_size=8)
  objective = fo.FlavaObjective(config, models.build_model(config))
  batch = {k: jnp.asarray(v) for k, v in flava_batch(config).items()}
  make = jax.jit(objective.make_inputs)
  a, b, c = (jax.device_get(make(batch, jnp.int32(s))) for s in (5, 5, 6))
  for key in ("patch_mask", "selected", "mm_text", "swap"):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["patch_mask"], c["patch_mask"])
  # MLM selection never touches the all-PAD text of image-only rows.
  assert not a["selected"][batch["has_text"] == 0].any()


@pytest.mark.parametrize("mlm_on_paired", [False, True])
def test_loss_rows_mlm_on_text_only_data_unless_asked(mlm_on_paired):
  """Per example: MLM on text-only rows (paper, torchmultimodal), the paired captions only
  with loss.mlm_on_paired; MIM on image-only rows; MMM on matched pairs; ITM and
  contrastive on pairs."""
  config = flava_config(batch_size=8)
  batch = {k: jnp.asarray(v) for k, v in flava_batch(config).items()}
  kind = np.arange(8) % 4  # flava_batch: 0, 1 paired; 2 image-only; 3 text-only
  match = jnp.asarray([True, False] * 4)
  rows = jax.device_get(fo.loss_rows(batch, match, mlm_on_paired=mlm_on_paired))
  paired = kind < 2
  np.testing.assert_array_equal(rows["mlm"], (kind == 3) | (paired & mlm_on_paired))
  np.testing.assert_array_equal(rows["mim"], kind == 2)
  np.testing.assert_array_equal(rows["mmm"], paired & np.asarray(match))
  np.testing.assert_array_equal(rows["itm"], paired)
  np.testing.assert_array_equal(rows["contrastive"], paired)
  both = jax.device_get(fo.loss_rows(batch, match, mim_on_paired=True))
  np.testing.assert_array_equal(both["mim"], kind != 3)


def np_flava_losses(batch, inputs, out, patch_size, mlm_on_paired):
  """FLAVA's six losses in float64 NumPy from the model outputs and the step's masks, with
  the row rules written out: the reference for FlavaObjective.loss."""
  f64 = lambda x: np.asarray(x, np.float64)
  kind = np.arange(len(batch["text"])) % 4
  paired, image_only, text_only = kind < 2, kind == 2, kind == 3
  mlm_rows = text_only | (paired if mlm_on_paired else False)
  matched = paired & inputs["match"]
  sel, patch_mask, targets = inputs["selected"], inputs["patch_mask"], inputs["targets_text"]
  patches = np_patchify(f64(batch["image"]) * (2 / 255) - 1, patch_size)  # pixels -> [-1, 1]
  pixels = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
      patches.var(-1, keepdims=True) + 1e-6)
  return dict(
      mlm_loss=np_token_ce(f64(out["mlm_logits"]), targets, sel & mlm_rows[:, None]),
      mim_loss=np_patch_mse(f64(out["mim_pred"]), pixels, patch_mask & image_only[:, None]),
      mmm_text_loss=np_token_ce(f64(out["mmm_text_logits"]), targets, sel & matched[:, None]),
      mmm_image_loss=np_patch_mse(f64(out["mmm_image_pred"]), pixels,
                                  patch_mask & matched[:, None]),
      itm_loss=np_itm_bce(f64(out["itm_logit"]), f64(inputs["match"]), paired),
      contrastive_loss=np_contrastive(f64(out["image_emb"]), f64(out["text_emb"]),
                                      batch["label"], paired, float(out["logit_scale"]))), (
      int((sel & mlm_rows[:, None]).sum()))


@pytest.mark.parametrize("mlm_on_paired", [False, True])
def test_loss_equals_float64_reference_and_switches_phase_at_the_configured_step(
    mlm_on_paired):
  """Steps 2 and 3 with loss.unimodal_steps=3: every loss equals its float64 reference
  (MLM weighted over exactly the rows loss_rows names), the total is MLM + MIM at step 2
  and all six at step 3."""
  config = flava_config(batch_size=16, **{"loss.unimodal_steps": 3, "loss.mlm_rate": 0.5,
                                         "loss.itm_negative_rate": 0.5,
                                         "loss.mlm_on_paired": mlm_on_paired})
  model = models.build_model(config)
  objective = fo.FlavaObjective(config, model)
  params = init_params(config, model)
  batch = flava_batch(config, seed=3)

  @jax.jit
  def run(params, batch, step):
    loss, metrics = objective.loss(params, batch, step)
    inputs = objective.make_inputs(batch, step)
    out = model.apply({"params": params}, batch["image"], inputs["patch_mask"], batch["text"],
                      inputs["mm_text"], method="pretrain")
    return loss, metrics, inputs, out

  for step in (2, 3):
    loss, metrics, inputs, out = jax.device_get(run(params, batch, jnp.int32(step)))
    reference, mlm_tokens = np_flava_losses(batch, inputs, out, config.model.patch_size,
                                            mlm_on_paired)
    assert int(metrics["mlm_tokens"]) == mlm_tokens > 0
    for key, value in reference.items():
      assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    joint = step >= 3
    assert int(metrics["joint_phase"]) == joint
    expected = sum(reference[k] for k in fo.LOSS_KEYS if joint or k in ("mlm_loss",
                                                                         "mim_loss"))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
