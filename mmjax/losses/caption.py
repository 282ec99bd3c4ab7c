"""The captioning head fused with its cross-entropy, in token chunks (`fused_caption_loss`):
`token_ce` of a linear head's logits (the captioning output projection) computed in token
chunks, forward and backward, never holding the [B, T, V] logits; one device or under
`jax.shard_map` with the vocabulary split."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


# --- captioning head fused with its cross-entropy, in token chunks ----------------------
# `fused_caption_loss(hidden, kernel, targets, mask)` equals
# `token_ce(hidden @ kernel, targets, mask)` (the logits computed in `hidden`'s
# dtype, then float32, as the model's `lm_head` / tied `attend` compute them) without ever
# holding the [B, T, V] logits: the T token positions are processed `chunk_size` at a time,
# so at most [B, chunk_size, V] logits (float32) exist per device. At CoCa-Base's
# 256 examples x 63 tokens x 64,000 vocabulary per device the plain loss holds 4.1 GB of
# float32 logits, plus their bfloat16 copy and gradient; chunks of 8 tokens hold 0.5 GB.
#
# The backward never recomputes the logits either: the loss is a scalar, so its gradients
# with respect to `hidden` and `kernel` are the loss's cotangent times the gradients of the
# summed NLL, and those are computed chunk by chunk in the forward pass, while each chunk's
# logits exist (the same three matrix products per chunk as the plain forward + backward).
# They are the `jax.custom_vjp`'s residuals: dH float32 [B, T, D] and dW float32 [D, V] (as
# sharded as the kernel), and the backward only scales them. Evaluated without
# differentiation, only the loss is computed.
#
# With a mesh (`mesh=`), the chunked loop runs per device under `jax.shard_map`: each device
# holds its rows of the batch (split over `batch_axes`) and its slice of the vocabulary
# (split over `vocab_axis`, as the `vocab` logical axis of the kernel is). The row-wise
# log-sum-exp and target logit are combined across the vocabulary slices per chunk
# (collectives of [B/n, chunk] floats); dW is reduced over the batch devices once, after the
# loop, not once per chunk (which is what an auto-partitioned loop carry would do).
#
# Notation: B batch (rows), T tokens, D model width, V vocabulary, c = chunk_size,
# n = devices over `batch_axes`, m = B / n rows per device, t = devices over `vocab_axis`.


def fused_caption_loss(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                       mask: jax.Array, *, chunk_size: int, mesh: Mesh | None = None,
                       batch_axes: Sequence[str] = ("data", "fsdp"),
                       vocab_axis: str | Sequence[str] | None = "tensor",
                       embed_axes: str | Sequence[str] | None = ("fsdp",)
                       ) -> tuple[jax.Array, jax.Array]:
  """Token cross-entropy of `hidden @ kernel`, averaged over the tokens where mask > 0.

  Args:
    hidden: [B, T, D] final decoder states, in the compute dtype (float32 or bfloat16).
    kernel: [D, V] output projection in any float dtype (the parameter dtype); it is cast
      to `hidden`'s dtype for the product, as `nn.Dense(dtype=...)` does. A tied embedding
      table [V, D] is passed transposed (XLA folds the transpose into the products).
    targets: int [B, T] next-token ids in [0, V).
    mask: [B, T]; tokens with mask > 0 count, the others (padding) are ignored.
    chunk_size: token positions per chunk (>= 1); T is padded up to a multiple of it.
    mesh: if given, run per device under `jax.shard_map` over this mesh (see the module
      docstring); None computes on whatever devices the inputs live on, as plain jnp.
    batch_axes: mesh axes that split B (absent ones are ignored).
    vocab_axis: the mesh axis that splits V (the `vocab` rule's PartitionSpec entry; None
      or absent: not split).
    embed_axes: the mesh axes that split the kernel's D (the `embed` rule's entry). The
      kernel's gradient is reduce-scattered over those of them that also split B and
      all-reduced over the other batch axes, so it leaves with the kernel's own sharding.
  Returns:
    (loss, num_tokens): float32 scalars, loss = sum(mask * nll) / max(num_tokens, 1), as
    `token_ce`.
  """
  b, t, d = hidden.shape
  v = kernel.shape[1]
  if kernel.shape[0] != d or targets.shape != (b, t) or mask.shape != (b, t):
    raise ValueError(f"shape mismatch: hidden {hidden.shape}, kernel {kernel.shape}, "
                     f"targets {targets.shape}, mask {mask.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1")
  layout = _CaptionLayout(mesh, batch_axes, vocab_axis, embed_axes, d)
  if b % layout.batch_size or v % layout.vocab_size:
    raise ValueError(
        f"batch {b} / vocabulary {v} not divisible by the {layout.batch_size} batch devices "
        f"{layout.batch_axes} / {layout.vocab_size} vocabulary devices ({vocab_axis!r}); "
        "pad config model.text.vocab_size to a multiple of mesh.shape's tensor size")
  num_tokens = mask.astype(jnp.float32).sum()
  nll_sum = _make_nll_sum(layout, chunk_size, hidden.dtype, kernel.dtype)(
      hidden, kernel, targets.astype(jnp.int32), mask > 0)
  return nll_sum / jnp.maximum(num_tokens, 1.0), num_tokens


class _CaptionLayout:
  """How the arrays are split over the mesh (nothing is split without a mesh)."""

  def __init__(self, mesh: Mesh | None, batch_axes: Sequence[str], vocab_axis, embed_axes,
               width: int):
    sizes = dict(mesh.shape) if mesh is not None else {}
    self.mesh = mesh
    self.batch_axes = tuple(a for a in _axis_names(batch_axes) if a in sizes)
    vocab = tuple(a for a in _axis_names(vocab_axis) if a in sizes)
    if len(vocab) > 1:
      raise ValueError(f"the vocabulary is split over several mesh axes {vocab}; the fused "
                       "caption loss splits it over one (config mesh.rules 'vocab')")
    self.vocab_axis = vocab[0] if vocab else None
    embed_axes = _axis_names(embed_axes)
    self.batch_size = math.prod(sizes[a] for a in self.batch_axes)
    self.vocab_size = sizes[self.vocab_axis] if self.vocab_axis else 1
    # dW [D, V/t] is a partial sum over this device's rows: reduce-scatter it along D over
    # the batch axes that split the kernel's D (it then has the kernel's sharding) and
    # all-reduce it over the rest, after the loop.
    scatter = tuple(a for a in self.batch_axes if a in embed_axes)
    if width % math.prod(sizes[a] for a in scatter):
      scatter = ()
    self.scatter_axes = scatter
    self.reduce_axes = tuple(a for a in self.batch_axes if a not in scatter)

  def psum_vocab(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.vocab_axis) if self.vocab_axis else x

  def pmax_vocab(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmax(x, self.vocab_axis) if self.vocab_axis else x

  def psum_batch(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.batch_axes) if self.batch_axes else x

  def reduce_d_kernel(self, d_kernel: jax.Array) -> jax.Array:
    """[D, V/t] partial sums -> [D / |scatter_axes|, V/t] summed over the batch devices."""
    if self.scatter_axes:
      d_kernel = jax.lax.psum_scatter(d_kernel, self.scatter_axes, scatter_dimension=0,
                                      tiled=True)
    return jax.lax.psum(d_kernel, self.reduce_axes) if self.reduce_axes else d_kernel

  def vocab_offset(self, v_local: int) -> jax.Array:
    """First vocabulary id of this device's kernel columns."""
    if not self.vocab_axis:
      return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(self.vocab_axis) * v_local

  def varying(self, x: jax.Array, over_vocab: bool) -> jax.Array:
    """Marks a loop-carry initialiser as varying over the batch devices (and the vocabulary
    devices): shard_map's type check wants a carry's type fixed across iterations."""
    axes = (*self.batch_axes, *([self.vocab_axis] if self.vocab_axis and over_vocab else []))
    return jax.lax.pcast(x, axes, to="varying") if self.mesh is not None and axes else x


def _axis_names(axes: str | Sequence[str] | None) -> tuple[str, ...]:
  """A PartitionSpec entry (None, one mesh axis or several) as a tuple of axis names."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _make_nll_sum(layout: _CaptionLayout, chunk: int, hidden_dtype, kernel_dtype):
  """The custom_vjp (hidden, kernel, targets, valid) -> summed NLL for fixed static args."""

  def per_device(hidden, kernel, targets, valid, with_grads):
    return _chunked_nll(hidden, kernel, targets, valid, chunk, layout, with_grads)

  forward = functools.partial(per_device, with_grads=False)
  forward_with_grads = functools.partial(per_device, with_grads=True)
  if layout.mesh is not None:
    rows = P(layout.batch_axes or None)
    d_kernel = P(layout.scatter_axes or None, layout.vocab_axis)
    specs = dict(mesh=layout.mesh, in_specs=(rows, P(None, layout.vocab_axis), rows, rows))
    forward = jax.shard_map(forward, out_specs=P(), **specs)
    forward_with_grads = jax.shard_map(forward_with_grads, out_specs=(P(), rows, d_kernel),
                                       **specs)

  @jax.custom_vjp
  def nll_sum(hidden, kernel, targets, valid):
    return forward(hidden, kernel, targets, valid)

  def nll_sum_fwd(hidden, kernel, targets, valid):
    total, d_hidden, d_kernel = forward_with_grads(hidden, kernel, targets, valid)
    return total, (d_hidden, d_kernel, targets, valid)

  def nll_sum_bwd(residuals, g):
    d_hidden, d_kernel, targets, valid = residuals
    return ((g * d_hidden).astype(hidden_dtype), (g * d_kernel).astype(kernel_dtype),
            jnp.zeros(targets.shape, jax.dtypes.float0),
            jnp.zeros(valid.shape, jax.dtypes.float0))

  nll_sum.defvjp(nll_sum_fwd, nll_sum_bwd)
  return nll_sum


def _chunked_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, valid: jax.Array,
                 chunk: int, layout: _CaptionLayout, with_grads: bool):
  """One device's part: hidden [m, T, D], kernel [D, V/t], targets/valid [m, T].

  Returns the NLL summed over every device's valid tokens (a replicated scalar) and, with
  `with_grads`, its gradients summed over every device's rows: d_hidden float32
  [m, T, D] and d_kernel float32 [D / |scatter_axes|, V/t] (`_CaptionLayout.reduce_d_kernel`).
  """
  m, t, d = hidden.shape
  v_local = kernel.shape[1]
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  w = kernel.astype(hidden.dtype)
  offset = layout.vocab_offset(v_local)

  def split(x):  # [m, T, ...] -> [n_chunks, m, chunk, ...], padded tokens invalid
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(m, n_chunks, chunk, *x.shape[2:]), 0, 1)

  def step(carry, xs):
    total, d_kernel = carry
    h, ids, ok = xs  # [m, c, D], [m, c], [m, c]
    logits = jnp.dot(h, w).astype(jnp.float32)  # [m, c, V/t], as nn.Dense computes them
    local_ids = ids - offset
    in_slice = (local_ids >= 0) & (local_ids < v_local)
    one_hot = (jnp.arange(v_local) == local_ids[..., None]) & in_slice[..., None]
    target_logit = layout.psum_vocab(jnp.where(one_hot, logits, 0.0).sum(-1))
    row_max = layout.pmax_vocab(logits.max(-1))
    sum_exp = layout.psum_vocab(jnp.exp(logits - row_max[..., None]).sum(-1))
    lse = row_max + jnp.log(sum_exp)
    # where(), as token_ce: a non-finite value at a padded token must not leak in.
    total = total + jnp.where(ok, lse - target_logit, 0.0).sum()
    if not with_grads:
      return (total, d_kernel), None
    d_logits = jnp.where(ok[..., None], jnp.exp(logits - lse[..., None]) - one_hot, 0.0)
    d_logits = d_logits.astype(hidden.dtype)  # as the plain path's backward through astype
    d_h = jnp.einsum("mcv,dv->mcd", d_logits, w, preferred_element_type=jnp.float32)
    d_kernel = d_kernel + jnp.einsum("mcd,mcv->dv", h, d_logits,
                                     preferred_element_type=jnp.float32)
    return (total, d_kernel), d_h

  d_kernel0 = layout.varying(jnp.zeros((d, v_local) if with_grads else (), jnp.float32),
                             over_vocab=True)
  total0 = layout.varying(jnp.zeros((), jnp.float32), over_vocab=False)
  (total, d_kernel), d_h = jax.lax.scan(step, (total0, d_kernel0),
                                        (split(hidden), split(targets), split(valid)))
  total = layout.psum_batch(total)  # the vocabulary devices agree already
  if not with_grads:
    return total
  d_hidden = jnp.swapaxes(d_h, 0, 1).reshape(m, n_chunks * chunk, d)[:, :t]
  # Each vocabulary slice contributed its columns' share of dH.
  return total, layout.psum_vocab(d_hidden), layout.reduce_d_kernel(d_kernel)
