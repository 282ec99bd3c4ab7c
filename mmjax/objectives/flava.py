"""FLAVA's objective (arXiv 2112.04482): masking, ITM negatives, MIM targets and the joint
loss of MLM, MIM, MMM (text, image), ITM and contrastive (`config.loss`, name "flava").

Which loss applies to which example comes from the batch flags (int32 [B], see
`mmjax.data.transforms`): `has_image`, `has_text`, `paired`; `loss_rows` computes it.

  loss            examples (rows)                      averaged over
  mlm_loss        has_text & ~paired (text-only)       selected (15%) tokens of those rows
  mim_loss        has_image & ~paired (image-only)     masked (~40%) patches of those rows
  mmm_text_loss   paired & matched (ITM positive)      selected tokens of those rows
  mmm_image_loss  paired & matched                     masked patches of those rows
  itm_loss        paired                               those rows
  contrastive     paired                               those rows (both directions)

As the paper and torchmultimodal's FLAVAPretrainingLoss (which computes MLM and MIM only
when there is no multimodal output): the unimodal losses train on unimodal data, and a
paired caption is masked-modelled through the multimodal encoder (MMM) only.
`loss.mlm_on_paired=True` adds MLM on the paired captions (all has_text rows), and
`loss.mim_on_paired=True` MIM on the paired images: options, off by default.

Token- / patch-level losses are means over the tokens / patches of the rows they apply to
(BERT / BEiT convention), so a row contributes in proportion to its masked positions.

Schedule: the paper pretrains the unimodal encoders first (MIM / MLM on unimodal data),
then trains every objective jointly. Here both phases are one run: for
`step < loss.unimodal_steps` only MLM and MIM enter the loss (the other four are still
computed and logged, multiplied by 0), and the data pipeline draws those steps' batches
from the unimodal sources only (`mmjax.data.pipeline`); from step `unimodal_steps` on,
all six losses on the whole mixture. The text and image encoders share no parameters, so
the unimodal phase is the paper's two separate unimodal pretrainings run side by side. The
phase is a function of the train-state step, so a resumed run continues in the right phase.

Randomness (masks, negatives) is `jax.random.fold_in(jax.random.key(seed), step)`: a pure
function of (config.seed, step), identical after a resume and on any mesh.

MIM targets (a documented deviation from the paper, whose targets are the tokens of
DALL-E's pretrained dVAE, a codebook of 8192 at 112 px, which cannot be downloaded here):
  * "pixels" (default): the masked patch's pixels, normalised per patch to zero mean / unit
    variance (MAE), regressed with mean squared error over the patch's p*p*3 values.
  * "codebook": `loss.codebook_path` is an .npz with `centroids` float [K, p*p*3] in the
    pixel space the model sees ([-1, 1]: uint8 pixel x is x * 2/255 - 1,
    `vit.normalize_images`; each patch flattened in (row, col, channel) order); a patch's
    target is the index of its nearest centroid (squared L2) and the head classifies it
    with cross-entropy. `fit_patch_codebook` makes one by k-means on
    training images (a stand-in for the paper's dVAE tokens). A dVAE's tokens can be used
    the same way once exported as such centroids; a learned encoder is not supported.

Contrastive: the UniCL loss restricted to paired rows (`masked_contrastive_loss`): on an
all-paired batch it equals `losses.unicl_loss_dense` (tested). It is dense (B x B logits),
not the memory-linear ring of `losses.unicl_loss`: fine for FLAVA's 8k batches.
"""
from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import schema
from mmjax.data import transforms
from mmjax.losses import itm_bce, masked_contrastive_loss, patch_mse, token_ce
from mmjax.models import vit
from mmjax.models.flava import MIM_TARGETS, FlavaConfig
from mmjax.vocabulary import FIRST_REGULAR_ID

LOSS_KEYS = ("mlm_loss", "mim_loss", "mmm_text_loss", "mmm_image_loss", "itm_loss",
             "contrastive_loss")
Batch = dict[str, jax.Array]


# --- masking ----------------------------------------------------------------------------------
def mlm_mask(rng: jax.Array, text: jax.Array, vocab_size: int, mask_id: int,
             rate: float = 0.15) -> tuple[jax.Array, jax.Array]:
  """BERT masking.

  Each regular token (id >= 4; never PAD/EOS/BOS/UNK) is selected with probability `rate`;
  a selected token becomes `mask_id` with p 0.8, a uniform random regular token with p 0.1,
  and stays unchanged with p 0.1.
  Args: text int32 [B, L]. Returns (masked text int32 [B, L], selected bool [B, L]).
  """
  k_sel, k_how, k_tok = jax.random.split(rng, 3)
  selected = (text >= FIRST_REGULAR_ID) & (jax.random.uniform(k_sel, text.shape) < rate)
  how = jax.random.uniform(k_how, text.shape)
  random_tokens = jax.random.randint(k_tok, text.shape, FIRST_REGULAR_ID, vocab_size,
                                     dtype=text.dtype)
  masked = jnp.where(selected & (how < 0.8), mask_id,
                     jnp.where(selected & (how >= 0.8) & (how < 0.9), random_tokens, text))
  return masked.astype(text.dtype), selected


def _block_mask_one(rng: jax.Array, grid: int, target: int, min_block: int,
                    max_aspect: float, attempts: int) -> jax.Array:
  """One BEiT block mask over a grid x grid patch grid -> bool [grid*grid] with exactly
  `target` True. See `block_mask`."""
  rows = jnp.arange(grid)[:, None]
  cols = jnp.arange(grid)[None, :]
  log_aspect = math.log(max_aspect)

  def attempt(_, carry):
    mask, key = carry
    key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    remaining = target - mask.sum()
    # BEiT: block area uniform in [min_block, patches still to mask], log-uniform aspect.
    area = jax.random.uniform(k_area, minval=min_block,
                              maxval=jnp.maximum(remaining, min_block).astype(jnp.float32))
    aspect = jnp.exp(jax.random.uniform(k_aspect, minval=-log_aspect, maxval=log_aspect))
    h = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, grid).astype(jnp.int32)
    w = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, grid).astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, grid - h + 1)
    left = jax.random.randint(k_left, (), 0, grid - w + 1)
    block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    delta = (block & ~mask).sum()
    # Accept a block only if it adds patches without overshooting the target (as BEiT).
    accept = (delta > 0) & (delta <= remaining)
    return jnp.where(accept, mask | block, mask), key

  mask, key = jax.lax.fori_loop(0, attempts, attempt,
                                (jnp.zeros((grid, grid), bool), rng))
  # Top up with random single patches so every image has exactly `target` masked patches
  # (BEiT may stop short; an exact count keeps the per-row weight of MIM constant).
  flat = mask.reshape(-1)
  remaining = target - flat.sum()
  score = jnp.where(flat, 2.0, jax.random.uniform(key, flat.shape))
  rank = jnp.argsort(jnp.argsort(score))
  return flat | (rank < remaining)


def block_mask(rng: jax.Array, batch: int, grid: int, ratio: float = 0.4,
               min_block: int = 16, max_aspect: float = 1 / 0.3,
               attempts: int = 20) -> jax.Array:
  """BEiT-style blockwise masking (arXiv 2106.08254, Algorithm 1).

  Repeatedly masks a random rectangle (area uniform in [min_block, remaining], aspect ratio
  log-uniform in [1/max_aspect, max_aspect]) while it adds new patches without exceeding
  round(ratio * N); `attempts` rectangles are tried, then single random patches top the
  mask up to exactly round(ratio * N).
  Returns bool [batch, grid*grid] (row-major patch order, as the patch embedding).
  """
  n = grid * grid
  target = int(round(ratio * n))
  keys = jax.random.split(rng, batch)
  return jax.vmap(lambda k: _block_mask_one(k, grid, target, min(min_block, target),
                                            max_aspect, attempts))(keys)


def itm_negatives(rng: jax.Array, paired: jax.Array,
                  rate: float) -> tuple[jax.Array, jax.Array]:
  """Caption swaps for image-text matching, drawn inside the (global) batch.

  The paired rows are put in a random order p_0..p_{k-1} and row p_i's candidate partner is
  p_{(i+1) mod k}: a permutation of the paired rows with no fixed point whenever k >= 2,
  so a swapped caption is never the row's own. Each paired row swaps with probability
  `rate`.
  Args: paired bool [B]. Returns (partner int32 [B], swap bool [B]); partner is only
  meaningful where paired, swap is False elsewhere (and for every row when k < 2).
  """
  k_order, k_swap = jax.random.split(rng)
  b = paired.shape[0]
  order = jnp.argsort(jnp.where(paired, jax.random.uniform(k_order, (b,)), 2.0))
  k = paired.sum()
  position = jnp.arange(b)
  nxt = jnp.where(position + 1 < k, position + 1, 0)
  partner = jnp.zeros((b,), jnp.int32).at[order].set(order[nxt].astype(jnp.int32))
  swap = paired & (k >= 2) & (jax.random.uniform(k_swap, (b,)) < rate)
  return partner, swap


# --- MIM targets -------------------------------------------------------------------------------
def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """images [B, H, W, C] -> patches [B, (H/p)*(W/p), p*p*C], row-major patches, each
  flattened in (row, col, channel) order."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def normalized_pixels(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """MAE targets: each patch [..., P] standardised over its P values (float32)."""
  patches = patches.astype(jnp.float32)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True)
  return (patches - mean) * jax.lax.rsqrt(var + eps)


def codebook_codes(patches: jax.Array, centroids: jax.Array) -> jax.Array:
  """Nearest centroid (squared L2) of each patch: [B, N, P], [K, P] -> int32 [B, N]."""
  patches = patches.astype(jnp.float32)
  centroids = centroids.astype(jnp.float32)
  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is constant per patch.
  dist = -2.0 * patches @ centroids.T + (centroids * centroids).sum(-1)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def load_codebook(path: str, patch_values: int) -> np.ndarray:
  """`centroids` float32 [K, patch_values] from an .npz (see the module docstring)."""
  if not os.path.isfile(path):
    raise ValueError(f"config loss.codebook_path={path!r}: no such file (make one with "
                     "mmjax.objectives.flava.fit_patch_codebook)")
  with np.load(path) as f:
    if "centroids" not in f:
      raise ValueError(f"config loss.codebook_path={path!r} has no 'centroids' array "
                       f"(keys: {list(f.keys())})")
    centroids = np.asarray(f["centroids"], np.float32)
  if centroids.ndim != 2 or centroids.shape[1] != patch_values:
    raise ValueError(f"config loss.codebook_path={path!r}: centroids {centroids.shape}, "
                     f"expected [K, {patch_values}] (patch_size**2 * 3)")
  return centroids


def fit_patch_codebook(images: np.ndarray, patch_size: int, num_codes: int,
                       iterations: int = 20, seed: int = 0) -> np.ndarray:
  """k-means (Lloyd) on the patches of `images` [N, H, W, 3], uint8 pixels (as the data
  pipeline emits them) or floating point in [-1, 1], in the model's pixel space [-1, 1].

  Returns centroids float32 [num_codes, patch_size**2 * 3]; save them with
  `np.savez(path, centroids=...)` and set loss.mim_target='codebook',
  loss.codebook_path=path, loss.codebook_size=num_codes.
  """
  pixels = vit.normalize_images(jnp.asarray(images), jnp.float32)
  x = np.asarray(patchify(pixels, patch_size)).reshape(-1, patch_size ** 2 * 3)
  x = x.astype(np.float64)
  rng = np.random.default_rng(seed)
  centroids = x[rng.choice(len(x), num_codes, replace=len(x) < num_codes)]
  for _ in range(iterations):
    codes = np.argmin(-2 * x @ centroids.T + (centroids ** 2).sum(-1), axis=1)
    for k in range(num_codes):
      members = x[codes == k]
      if len(members):  # an empty cluster keeps its old centroid
        centroids[k] = members.mean(0)
  return centroids.astype(np.float32)


# --- which rows each loss reads --------------------------------------------------------------
def loss_rows(batch: Batch, match: jax.Array, mlm_on_paired: bool = False,
              mim_on_paired: bool = False) -> dict[str, jax.Array]:
  """bool [B] per loss: the examples it applies to (see the module docstring's table).

  Args: batch with int32 [B] flags has_image, has_text, paired; match bool [B] (ITM
  positive: the caption kept, or a swap that still describes the image).
  Returns dict mlm, mim, mmm (both MMM losses), itm, contrastive.
  """
  has_image, has_text = batch["has_image"] > 0, batch["has_text"] > 0
  paired = batch["paired"] > 0
  return dict(mlm=has_text & (True if mlm_on_paired else ~paired),
              mim=has_image & (True if mim_on_paired else ~paired),
              mmm=paired & match, itm=paired, contrastive=paired)


# --- the objective -----------------------------------------------------------------------------
class FlavaObjective:
  """FLAVA's joint loss; every method is a pure function of its inputs."""
  section = staticmethod(schema.flava_loss)  # its `loss` keys
  modalities = transforms.MODALITIES  # paired, image-only and text-only views

  @staticmethod
  def check(config: ml_collections.ConfigDict) -> list[str]:
    """Problems of its `loss` keys (the codebook file is read), one line each."""
    f, problems = config.loss, []
    if config.model.name != "flava":
      problems.append(f"config loss.name='flava' needs model.name='flava' (its heads), not "
                      f"{config.model.name!r}")
    if config.grad_accum_steps != 1:
      problems.append(f"config grad_accum_steps={config.grad_accum_steps} must be 1 for FLAVA "
                      "(gradient caching is implemented for the CoCa/UniCL objective only)")
    if f.unimodal_steps > 0 and not any(s.modality != "paired" and s.weight > 0
                                        for s in config.data.sources.values()):
      problems.append(f"config loss.unimodal_steps={f.unimodal_steps}: the unimodal phase "
                      "needs a source with modality 'image' or 'text' in data.sources (or set "
                      "loss.unimodal_steps=0)")
    if f.mim_target not in MIM_TARGETS:
      problems.append(f"config loss.mim_target={f.mim_target!r}: choose one of "
                      f"{list(MIM_TARGETS)}")
    elif f.mim_target == "codebook":
      try:
        centroids = load_codebook(f.codebook_path, config.model.patch_size ** 2 * 3)
      except ValueError as e:
        return problems + [str(e)]
      if len(centroids) != f.codebook_size:
        problems.append(f"config loss.codebook_size={f.codebook_size} but "
                        f"{f.codebook_path} has {len(centroids)} centroids")
    return problems

  @staticmethod
  def unimodal_steps(config: ml_collections.ConfigDict) -> int:
    """The paper's unimodal phase, `loss.unimodal_steps` (`mmjax.data.pipeline`)."""
    return int(config.loss.unimodal_steps)

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, mesh: Any = None):
    self.model, self.config, self.mesh = model, config, mesh
    self.c = FlavaConfig.from_config(config)
    self.f = config.loss
    self.centroids = None
    if self.f.mim_target == "codebook":
      self.centroids = load_codebook(self.f.codebook_path, self.c.patch_size ** 2 * 3)

  def mim_targets(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] (uint8 pixels or [-1, 1], as the model's) -> [B, N, P] float
    (pixels) or int32 [B, N] (codebook), from the pixels the model sees in [-1, 1]."""
    patches = patchify(vit.normalize_images(images, jnp.float32), self.c.patch_size)
    if self.centroids is None:
      return normalized_pixels(patches)
    return codebook_codes(patches, jnp.asarray(self.centroids))

  def mim_loss(self, pred: jax.Array, targets: jax.Array,
               weights: jax.Array) -> jax.Array:
    if self.centroids is None:
      return patch_mse(pred, targets, weights)[0]
    return token_ce(pred, targets, weights)[0]

  def make_inputs(self, batch: Batch, step: jax.Array) -> dict[str, jax.Array]:
    """Masks and ITM swaps for this step (pure function of config.seed and step)."""
    f, c = self.f, self.c
    rng = jax.random.fold_in(jax.random.key(self.config.seed), step)
    k_mlm, k_mim, k_itm = jax.random.split(rng, 3)
    text, paired = batch["text"], batch["paired"] > 0
    partner, swap = itm_negatives(k_itm, paired, f.itm_negative_rate)
    swapped_text = jnp.where(swap[:, None], text[partner], text)
    # A swapped caption identical to the row's own (duplicate texts), or one of the same
    # class under label-aware training, still describes the image: it counts as a match.
    same_text = jnp.all(swapped_text == text, axis=1)
    same_class = (batch["label"] >= 0) & (batch["label"][partner] == batch["label"])
    if not self.f.label_aware:
      same_class = jnp.zeros_like(same_class)
    match = ~swap | same_text | same_class
    mm_text, selected = mlm_mask(k_mlm, swapped_text, c.text.vocab_size, c.mask_id, f.mlm_rate)
    grid = c.image_size // c.patch_size
    patch_mask = block_mask(k_mim, text.shape[0], grid, f.mim_ratio, f.mim_min_block)
    return dict(mm_text=mm_text, selected=selected, targets_text=swapped_text,
                patch_mask=patch_mask, match=match, swap=swap, partner=partner)

  def loss(self, params: Any, batch: Batch,
           step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted FLAVA objective; metrics carry every loss (unweighted) and counts."""
    f = self.f
    inputs = self.make_inputs(batch, step)
    out = self.model.apply({"params": params}, batch["image"], inputs["patch_mask"],
                           batch["text"], inputs["mm_text"], method="pretrain")
    rows = loss_rows(batch, inputs["match"], f.mlm_on_paired, f.mim_on_paired)
    paired = rows["itm"]
    sel, pmask = inputs["selected"], inputs["patch_mask"]
    targets_img = self.mim_targets(batch["image"])
    labels = batch["label"] if self.f.label_aware else jnp.full_like(
        batch["label"], -1)

    mlm, mlm_tokens = token_ce(out["mlm_logits"], inputs["targets_text"],
                               sel & rows["mlm"][:, None])
    mim = self.mim_loss(out["mim_pred"], targets_img, pmask & rows["mim"][:, None])
    mmm_text, _ = token_ce(out["mmm_text_logits"], inputs["targets_text"],
                           sel & rows["mmm"][:, None])
    mmm_image = self.mim_loss(out["mmm_image_pred"], targets_img,
                              pmask & rows["mmm"][:, None])
    itm, _ = itm_bce(out["itm_logit"], inputs["match"], rows["itm"])
    contrastive = masked_contrastive_loss(out["image_emb"], out["text_emb"], labels,
                                          rows["contrastive"], out["logit_scale"])

    w = f.weights
    joint = step >= f.unimodal_steps
    unimodal = w.mlm * mlm + w.mim * mim
    multimodal = (w.mmm_text * mmm_text + w.mmm_image * mmm_image + w.itm * itm
                  + w.contrastive * contrastive)
    loss = unimodal + jnp.where(joint, multimodal, 0.0)
    metrics = dict(mlm_loss=mlm, mim_loss=mim, mmm_text_loss=mmm_text,
                   mmm_image_loss=mmm_image, itm_loss=itm, contrastive_loss=contrastive,
                   logit_scale=out["logit_scale"], joint_phase=joint.astype(jnp.int32),
                   mlm_tokens=mlm_tokens, itm_negatives=(paired & ~inputs["match"]).sum(),
                   paired_examples=paired.sum())
    return loss, metrics

  def grads(self, params: Any, batch: Batch,
            step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(params, batch, step)
    return loss, aux, grads
