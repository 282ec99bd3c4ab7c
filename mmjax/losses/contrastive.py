"""Contrastive losses: UniCL (label-aware contrastive, CLIP as a special case) and SigLIP
(label-aware sigmoid contrastive), dense and ring-sharded; FLAVA's masked UniCL.

`unicl_loss` and `siglip_loss` have two paths:
  * mesh=None: a dense reference-style implementation (B x B logits), differentiated by JAX.
  * mesh given: a memory-linear ring implementation under `jax.shard_map`. Each device keeps
    its own B/n rows of images, texts and labels; text blocks (with their labels) travel
    around a ring of `ppermute`s and each device accumulates its rows' terms against every
    block (UniCL: running log-sum-exp / positive sums for both directions; SigLIP: the sum
    of independent pair terms, no normaliser). A `jax.custom_vjp` recomputes the blocks in
    the backward pass, so no device ever materialises the whole other modality, a B x B
    matrix, or the saved blocks of the forward pass. Only [B/n, chunk] blocks of logits
    exist at any time.

Notation: B global batch, n = product of the mesh sizes of `batch_axes`, m = B / n rows per
device, D embedding width, c chunk width (columns of a received block processed at once).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

# Logit blocks are processed in [m, c] pieces with at most this many elements (16 MiB f32)
# when chunk_size is None: keeps the per-device temporaries bounded independently of B.
_AUTO_CHUNK_ELEMS = 1 << 22


def l2_normalize(x: jax.Array) -> jax.Array:
  """Row-wise L2 normalisation in float32. x: [B, D] -> [B, D] float32."""
  x = x.astype(jnp.float32)
  # rsqrt of a clamped squared norm: an all-zero row gives zeros instead of NaNs.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def positive_mask(row_labels: jax.Array, col_labels: jax.Array,
                  diagonal: jax.Array | bool) -> jax.Array:
  """Positive pairs between a block of rows and a block of columns.

  Args:
    row_labels: int [r]; -1 = no class (caption data).
    col_labels: int [c].
    diagonal: bool [r, c] (or broadcastable): True where row and column are the same example.
  Returns:
    bool [r, c]: same example, or same class id >= 0.
  """
  same_class = (row_labels[:, None] == col_labels[None, :]) & (row_labels[:, None] >= 0)
  return same_class | diagonal


def unicl_loss_dense(image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                     logit_scale: jax.Array | float) -> jax.Array:
  """Dense UniCL loss (materialises [B, B] logits). Inputs as in `unicl_loss`."""
  u = l2_normalize(image_emb)
  v = l2_normalize(text_emb)
  logits = jnp.asarray(logit_scale, jnp.float32) * (u @ v.T)  # [B, B]
  b = logits.shape[0]
  pos = positive_mask(labels, labels, jnp.eye(b, dtype=bool)).astype(jnp.float32)
  pos_logit = pos * logits
  # CE with a normalised multi-hot target = lse - mean of logits over the positives.
  row = jax.nn.logsumexp(logits, axis=1) - pos_logit.sum(1) / pos.sum(1)
  col = jax.nn.logsumexp(logits, axis=0) - pos_logit.sum(0) / pos.sum(0)
  return 0.5 * (row.mean() + col.mean())


def unicl_loss(image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
               logit_scale: jax.Array | float, *, mesh: Mesh | None = None,
               batch_axes: Sequence[str] = ("data", "fsdp"),
               chunk_size: int | None = None) -> jax.Array:
  """UniCL contrastive loss (CLIP when every label is -1).

  Positives: P[i, j] = (i == j) or (labels[i] == labels[j] >= 0). Image->text loss is the
  mean over rows i of the cross-entropy between softmax(logits[i, :]) and P[i, :] / sum_j
  P[i, j]; text->image the same over columns; the result is the mean of both directions.

  Args:
    image_emb: [B, D] image embeddings (any float dtype; normalised here in float32).
    text_emb: [B, D] text embeddings.
    labels: int [B]; -1 = no class (its only positive is its own pair), c >= 0 = class id.
    logit_scale: scalar multiplier, already exponentiated (logits = scale * img @ txt.T).
    mesh: if given, compute with the ring `shard_map` implementation; the batch dimension of
      the inputs is (or will be resharded to be) split over `batch_axes` of this mesh; other
      mesh axes (e.g. "tensor") see replicated data and compute redundantly.
    batch_axes: mesh axes the batch is sharded over (axes absent from the mesh are ignored).
    chunk_size: columns of a received [m, m] block processed at once in the ring path
      (must divide m = B / n). None picks the largest divisor of m keeping blocks at
      <= 4M elements.
  Returns:
    float32 scalar.
  """
  if mesh is None:
    return unicl_loss_dense(image_emb, text_emb, labels, logit_scale)

  axes, n, chunk_size = _ring_layout(mesh, batch_axes, image_emb, text_emb, labels,
                                     chunk_size)
  u = l2_normalize(image_emb)
  v = l2_normalize(text_emb)
  scale = jnp.asarray(logit_scale, jnp.float32)
  ring = _make_unicl_ring(mesh, axes, n, chunk_size, image_emb.shape[0])
  return ring(u, v, labels.astype(jnp.int32), scale)


def siglip_loss_dense(image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                      logit_scale: jax.Array | float,
                      logit_bias: jax.Array | float) -> jax.Array:
  """Dense SigLIP loss (materialises [B, B] logits). Inputs as in `siglip_loss`."""
  u = l2_normalize(image_emb)
  v = l2_normalize(text_emb)
  logits = (jnp.asarray(logit_scale, jnp.float32) * (u @ v.T)
            + jnp.asarray(logit_bias, jnp.float32))  # [B, B]
  b = logits.shape[0]
  sign = jnp.where(positive_mask(labels, labels, jnp.eye(b, dtype=bool)), 1.0, -1.0)
  return -jax.nn.log_sigmoid(sign * logits).sum() / b


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                logit_scale: jax.Array | float, logit_bias: jax.Array | float, *,
                mesh: Mesh | None = None, batch_axes: Sequence[str] = ("data", "fsdp"),
                chunk_size: int | None = None) -> jax.Array:
  """SigLIP's sigmoid contrastive loss (arXiv 2303.15343) with UniCL's label-aware pairs.

  Every image-text pair is its own binary classification: z[i, j] = t <u_i, v_j> + b with
  u, v the L2-normalised embeddings, target y[i, j] = +1 for positives P[i, j] = (i == j)
  or (labels[i] == labels[j] >= 0) and -1 otherwise, and
    loss = -(1/B) sum_i sum_j log sigmoid(y[i, j] z[i, j]).
  With every label -1 this is the paper's loss (positives on the diagonal only).

  Args:
    image_emb: [B, D] image embeddings (any float dtype; normalised here in float32).
    text_emb: [B, D] text embeddings.
    labels: int [B]; -1 = no class (its only positive is its own pair), c >= 0 = class id.
    logit_scale: t, the scalar multiplier, already exponentiated (t = exp(t')).
    logit_bias: b, the scalar bias.
    mesh, batch_axes, chunk_size: as in `unicl_loss` (ring implementation when mesh is
      given; memory linear in B).
  Returns:
    float32 scalar.
  """
  if mesh is None:
    return siglip_loss_dense(image_emb, text_emb, labels, logit_scale, logit_bias)

  axes, n, chunk_size = _ring_layout(mesh, batch_axes, image_emb, text_emb, labels,
                                     chunk_size)
  ring = _make_siglip_ring(mesh, axes, n, chunk_size, image_emb.shape[0])
  return ring(l2_normalize(image_emb), l2_normalize(text_emb), labels.astype(jnp.int32),
              jnp.asarray(logit_scale, jnp.float32), jnp.asarray(logit_bias, jnp.float32))


# ----------------------------------------------------------------------------------------
# Ring implementation.
# Device k holds rows [k m, (k+1) m). Every step each device sends its travelling block to
# device k-1, so at ring step s device k holds the block that started on device (k+s) % n;
# the diagonal (i == j) therefore only occurs at step 0, at equal local offsets. After n
# sends a travelling block is back on its owner, which is how column statistics and text
# gradients come home.
# ----------------------------------------------------------------------------------------

def _ring_layout(mesh: Mesh, batch_axes: Sequence[str], image_emb: jax.Array,
                 text_emb: jax.Array, labels: jax.Array,
                 chunk_size: int | None) -> tuple[tuple[str, ...], int, int]:
  """Checks the inputs of a ring loss; returns (batch axes present in the mesh, their
  device count n, chunk width c). c = chunk_size, or when None the largest divisor of
  m = B / n keeping [m, c] blocks at <= 4M elements."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in axes)
  b, _ = image_emb.shape
  if text_emb.shape != image_emb.shape or labels.shape != (b,):
    raise ValueError(f"shape mismatch: image {image_emb.shape}, text {text_emb.shape}, "
                     f"labels {labels.shape}")
  if b % n:
    raise ValueError(f"batch {b} not divisible by the {n} devices of batch axes {axes}")
  m = b // n
  if chunk_size is None:
    cap = max(1, _AUTO_CHUNK_ELEMS // m)
    chunk_size = max(d for d in range(1, min(m, cap) + 1) if m % d == 0)
  if m % chunk_size:
    raise ValueError(f"chunk_size {chunk_size} must divide the per-device batch {m}")
  return axes, n, chunk_size


def _ring_shift(x, axes: tuple[str, ...], n: int):
  """Sends a pytree from every device k to device k-1 along the batch axes."""
  if n == 1:
    return x
  axis_name = axes if len(axes) != 1 else axes[0]
  return jax.lax.ppermute(x, axis_name, [(i, (i - 1) % n) for i in range(n)])


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  # Loop carries start as constants (unvarying over the batch axes) but become varying
  # after one update; shard_map's type check requires the carry type to be fixed.
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def _block_sims(u_loc: jax.Array, v_blk: jax.Array, l_loc: jax.Array, l_blk: jax.Array,
                step: jax.Array, j0: jax.Array,
                c: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Local rows [m, D] vs columns [j0, j0+c) of the block held at ring `step`: the columns'
  texts v_c [c, D], cosine sims [m, c] and positives bool [m, c]."""
  v_c = jax.lax.dynamic_slice_in_dim(v_blk, j0, c, axis=0)
  l_c = jax.lax.dynamic_slice_in_dim(l_blk, j0, c, axis=0)
  rows = jnp.arange(u_loc.shape[0])[:, None]
  cols = j0 + jnp.arange(c)[None, :]
  return v_c, u_loc @ v_c.T, positive_mask(l_loc, l_c, (step == 0) & (rows == cols))


def _make_unicl_ring(mesh: Mesh, axes: tuple[str, ...], n: int, c: int, b: int):
  """Builds the custom_vjp ring loss for fixed mesh / axes / chunk / batch size."""
  spec = P(axes if axes else None)
  shift = lambda x: _ring_shift(x, axes, n)
  varying = lambda x: _varying(x, axes)

  def chunk_logits(u_loc, v_blk, l_loc, l_blk, scale, step, j0):
    """Scaled logits, cosine sims and positives of local rows vs columns [j0, j0+c)."""
    v_c, sims, pos = _block_sims(u_loc, v_blk, l_loc, l_blk, step, j0, c)
    return v_c, sims, scale * sims, pos.astype(jnp.float32)

  def fwd_body(u_loc, v_loc, l_loc, scale):
    """Per-device forward. Returns loss (replicated) and [m] statistics for the backward."""
    m = u_loc.shape[0]
    neg_inf = jnp.full((m,), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((m,), jnp.float32)

    def ring_step(step, carry):
      # Row stats (local images): running max / sum-exp / positive logit sum / count.
      # Column stats travel with the text block they describe.
      (r_max, r_sum, r_pos, r_cnt, v_blk, l_blk, c_lse, c_pos, c_cnt) = carry

      def chunk_step(ci, inner):
        r_max, r_sum, r_pos, r_cnt, c_lse, c_pos, c_cnt = inner
        j0 = ci * c
        _, _, logits, pos = chunk_logits(u_loc, v_blk, l_loc, l_blk, scale, step, j0)
        new_max = jnp.maximum(r_max, logits.max(1))
        r_sum = r_sum * jnp.exp(r_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(1)
        r_pos = r_pos + (pos * logits).sum(1)
        r_cnt = r_cnt + pos.sum(1)
        # This device's rows are one of n row blocks for these columns: merge its column
        # log-sum-exp into the travelling one.
        part = jax.nn.logsumexp(logits, axis=0)
        old = jax.lax.dynamic_slice_in_dim(c_lse, j0, c)
        c_lse = jax.lax.dynamic_update_slice_in_dim(c_lse, jnp.logaddexp(old, part), j0, 0)
        c_pos = _add_slice(c_pos, (pos * logits).sum(0), j0)
        c_cnt = _add_slice(c_cnt, pos.sum(0), j0)
        return new_max, r_sum, r_pos, r_cnt, c_lse, c_pos, c_cnt

      inner = (r_max, r_sum, r_pos, r_cnt, c_lse, c_pos, c_cnt)
      inner = jax.lax.fori_loop(0, m // c, chunk_step, inner)
      r_max, r_sum, r_pos, r_cnt, c_lse, c_pos, c_cnt = inner
      # Everything travelling moves one hop; after the last step this brings the column
      # statistics home (the text block itself is not needed any more, but sending it with
      # them keeps one loop body; its cost is one extra [m, D] hop out of n).
      v_blk, l_blk, c_lse, c_pos, c_cnt = shift((v_blk, l_blk, c_lse, c_pos, c_cnt))
      return (r_max, r_sum, r_pos, r_cnt, v_blk, l_blk, c_lse, c_pos, c_cnt)

    carry = (varying(neg_inf), varying(zeros), varying(zeros), varying(zeros), v_loc, l_loc,
             varying(neg_inf), varying(zeros), varying(zeros))
    carry = jax.lax.fori_loop(0, n, ring_step, carry)
    r_max, r_sum, r_pos, r_cnt, _, _, c_lse, c_pos, c_cnt = carry
    r_lse = r_max + jnp.log(r_sum)
    local = (r_lse - r_pos / r_cnt).sum() + (c_lse - c_pos / c_cnt).sum()
    loss = 0.5 * jax.lax.psum(local, axes) / b if axes else 0.5 * local / b
    return loss, r_lse, r_cnt, c_lse, c_cnt

  def bwd_body(u_loc, v_loc, l_loc, scale, r_lse, r_cnt, c_lse, c_cnt, g):
    """Per-device backward: recompute logits chunk by chunk, rotate text-gradient sums.

    dLoss/dlogits[i, j] = g / (2B) * (softmax_row[i, j] - P[i, j] / r_cnt[i]
                                      + softmax_col[i, j] - P[i, j] / c_cnt[j]).
    """
    coef = g / (2.0 * b)

    def ring_step(step, carry):
      du, ds, v_blk, l_blk, c_lse_blk, c_cnt_blk, dv_blk = carry

      def chunk_step(ci, inner):
        du, ds, dv_blk = inner
        j0 = ci * c
        v_c, sims, logits, pos = chunk_logits(u_loc, v_blk, l_loc, l_blk, scale, step, j0)
        lse_c = jax.lax.dynamic_slice_in_dim(c_lse_blk, j0, c)
        cnt_c = jax.lax.dynamic_slice_in_dim(c_cnt_blk, j0, c)
        grad = coef * (jnp.exp(logits - r_lse[:, None]) - pos / r_cnt[:, None]
                       + jnp.exp(logits - lse_c[None, :]) - pos / cnt_c[None, :])  # [m, c]
        du = du + scale * (grad @ v_c)
        dv_blk = _add_slice(dv_blk, scale * (grad.T @ u_loc), j0)
        ds = ds + (grad * sims).sum()
        return du, ds, dv_blk

      du, ds, dv_blk = jax.lax.fori_loop(0, v_blk.shape[0] // c, chunk_step, (du, ds, dv_blk))
      v_blk, l_blk, c_lse_blk, c_cnt_blk, dv_blk = shift(
          (v_blk, l_blk, c_lse_blk, c_cnt_blk, dv_blk))
      return du, ds, v_blk, l_blk, c_lse_blk, c_cnt_blk, dv_blk

    zeros_md = varying(jnp.zeros(u_loc.shape, jnp.float32))
    carry = (zeros_md, varying(jnp.zeros((), jnp.float32)), v_loc, l_loc, c_lse, c_cnt,
             zeros_md)
    du, ds, _, _, _, _, dv = jax.lax.fori_loop(0, n, ring_step, carry)
    ds = jax.lax.psum(ds, axes) if axes else ds
    return du, dv, ds

  vec = spec  # [B] vectors (labels, statistics) are split like the rows
  fwd_map = jax.shard_map(fwd_body, mesh=mesh, in_specs=(spec, spec, vec, P()),
                          out_specs=(P(), vec, vec, vec, vec))
  bwd_map = jax.shard_map(bwd_body, mesh=mesh,
                          in_specs=(spec, spec, vec, P(), vec, vec, vec, vec, P()),
                          out_specs=(spec, spec, P()))

  @jax.custom_vjp
  def ring_loss(u, v, labels, scale):
    return fwd_map(u, v, labels, scale)[0]

  def ring_fwd(u, v, labels, scale):
    loss, r_lse, r_cnt, c_lse, c_cnt = fwd_map(u, v, labels, scale)
    # Residuals are the inputs plus four [B] vectors: nothing of size B x B or B/n x B/n.
    return loss, (u, v, labels, scale, r_lse, r_cnt, c_lse, c_cnt)

  def ring_bwd(res, g):
    u, v, labels, scale, r_lse, r_cnt, c_lse, c_cnt = res
    du, dv, ds = bwd_map(u, v, labels, scale, r_lse, r_cnt, c_lse, c_cnt, g)
    # Integer labels get a float0 cotangent.
    dlabels = jnp.zeros(labels.shape, jax.dtypes.float0)
    return du, dv, dlabels, ds

  ring_loss.defvjp(ring_fwd, ring_bwd)
  return ring_loss


def _make_siglip_ring(mesh: Mesh, axes: tuple[str, ...], n: int, c: int, b: int):
  """Builds the custom_vjp SigLIP ring loss for fixed mesh / axes / chunk / batch size.

  The pair terms are independent, so the forward only sums them; the backward recomputes
  each [m, c] chunk and needs no statistics, only the inputs:
    dLoss/dz[i, j] = -g / B * y[i, j] * sigmoid(-y[i, j] z[i, j]).
  """
  spec = P(axes if axes else None)
  shift = lambda x: _ring_shift(x, axes, n)
  varying = lambda x: _varying(x, axes)
  psum = lambda x: jax.lax.psum(x, axes) if axes else x

  def chunk_terms(u_loc, v_blk, l_loc, l_blk, scale, bias, step, j0):
    """Texts v_c [c, D], cosine sims [m, c], targets y [m, c] and y * z [m, c]."""
    v_c, sims, pos = _block_sims(u_loc, v_blk, l_loc, l_blk, step, j0, c)
    y = jnp.where(pos, 1.0, -1.0)
    return v_c, sims, y, y * (scale * sims + bias)

  def fwd_body(u_loc, v_loc, l_loc, scale, bias):
    """Per-device forward: this device's rows against every block. Returns the loss."""

    def ring_step(step, carry):
      total, v_blk, l_blk = carry

      def chunk_step(ci, total):
        *_, signed = chunk_terms(u_loc, v_blk, l_loc, l_blk, scale, bias, step, ci * c)
        return total - jax.nn.log_sigmoid(signed).sum()

      total = jax.lax.fori_loop(0, v_blk.shape[0] // c, chunk_step, total)
      # The last hop only brings the block home (one extra [m, D] hop out of n).
      v_blk, l_blk = shift((v_blk, l_blk))
      return total, v_blk, l_blk

    carry = (varying(jnp.zeros((), jnp.float32)), v_loc, l_loc)
    total, _, _ = jax.lax.fori_loop(0, n, ring_step, carry)
    return psum(total) / b

  def bwd_body(u_loc, v_loc, l_loc, scale, bias, g):
    """Per-device backward: recompute chunk by chunk; text gradients travel with their
    block and are home after n hops."""
    coef = g / b

    def ring_step(step, carry):
      du, dscale, dbias, v_blk, l_blk, dv_blk = carry

      def chunk_step(ci, inner):
        du, dscale, dbias, dv_blk = inner
        j0 = ci * c
        v_c, sims, y, signed = chunk_terms(u_loc, v_blk, l_loc, l_blk, scale, bias, step, j0)
        grad = -coef * y * jax.nn.sigmoid(-signed)  # dLoss/dz [m, c]
        du = du + scale * (grad @ v_c)
        dv_blk = _add_slice(dv_blk, scale * (grad.T @ u_loc), j0)
        return du, dscale + (grad * sims).sum(), dbias + grad.sum(), dv_blk

      inner = jax.lax.fori_loop(0, v_blk.shape[0] // c, chunk_step, (du, dscale, dbias, dv_blk))
      du, dscale, dbias, dv_blk = inner
      v_blk, l_blk, dv_blk = shift((v_blk, l_blk, dv_blk))
      return du, dscale, dbias, v_blk, l_blk, dv_blk

    zeros_md = varying(jnp.zeros(u_loc.shape, jnp.float32))
    zero = varying(jnp.zeros((), jnp.float32))
    carry = (zeros_md, zero, zero, v_loc, l_loc, zeros_md)
    du, dscale, dbias, _, _, dv = jax.lax.fori_loop(0, n, ring_step, carry)
    return du, dv, psum(dscale), psum(dbias)

  fwd_map = jax.shard_map(fwd_body, mesh=mesh, in_specs=(spec, spec, spec, P(), P()),
                          out_specs=P())
  bwd_map = jax.shard_map(bwd_body, mesh=mesh, in_specs=(spec, spec, spec, P(), P(), P()),
                          out_specs=(spec, spec, P(), P()))

  @jax.custom_vjp
  def ring_loss(u, v, labels, scale, bias):
    return fwd_map(u, v, labels, scale, bias)

  def ring_fwd(u, v, labels, scale, bias):
    # Residuals are the inputs only: nothing of size B x B or B/n x B/n.
    return fwd_map(u, v, labels, scale, bias), (u, v, labels, scale, bias)

  def ring_bwd(res, g):
    du, dv, dscale, dbias = bwd_map(*res, g)
    dlabels = jnp.zeros(res[2].shape, jax.dtypes.float0)  # integer labels
    return du, dv, dlabels, dscale, dbias

  ring_loss.defvjp(ring_fwd, ring_bwd)
  return ring_loss


def _add_slice(acc: jax.Array, val: jax.Array, start) -> jax.Array:
  """acc[start:start+len(val)] += val along axis 0 (dynamic start)."""
  old = jax.lax.dynamic_slice_in_dim(acc, start, val.shape[0], axis=0)
  return jax.lax.dynamic_update_slice_in_dim(acc, old + val, start, axis=0)


def masked_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                            valid: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
  """UniCL loss over the rows where `valid` (image-only / text-only rows take no part).

  image_emb, text_emb [B, D]; labels int [B] (-1 = own pair only); valid bool [B].
  Positives as `positive_mask`, both restricted to valid rows and columns; each
  direction is the mean over valid rows of logsumexp over valid columns minus the mean
  logit of the positives; the loss is the mean of both directions (0 with no valid row).
  """
  u = l2_normalize(image_emb)
  v = l2_normalize(text_emb)
  logits = jnp.asarray(logit_scale, jnp.float32) * (u @ v.T)
  b = logits.shape[0]
  pair = valid[:, None] & valid[None, :]
  pos = (positive_mask(labels, labels, jnp.eye(b, dtype=bool)) & pair).astype(
      jnp.float32)
  # A large finite negative, not -inf: a row with no valid column (all-unpaired batch) must
  # keep a finite logsumexp, else its zero cotangent times a NaN gradient poisons the step.
  masked = jnp.where(pair, logits, -1e9)
  pos_logit = jnp.where(pos > 0, logits, 0.0)
  row = jax.nn.logsumexp(masked, axis=1) - pos_logit.sum(1) / jnp.maximum(pos.sum(1), 1.0)
  col = jax.nn.logsumexp(masked, axis=0) - pos_logit.sum(0) / jnp.maximum(pos.sum(0), 1.0)
  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  row = jnp.where(valid, row, 0.0).sum() / n
  col = jnp.where(valid, col, 0.0).sum() / n
  return 0.5 * (row + col)
