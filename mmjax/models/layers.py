"""Transformer building blocks shared by every mmjax model.

Parameters and main activations carry *logical* axis names (`batch`, `length`, `embed`,
`mlp`, `heads`, `kv`, `vocab`, `layers`); `mmjax.sharding` maps them to mesh axes with the
rules in the config. Kernels are 2-D (`embed` x `heads`) and reshaped to heads afterwards:
3-D logical kernels break under `jax.set_mesh` (see the stack notes).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def partitioned(init: Callable, axes: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """A dense layer whose kernel is named (in_axis, out_axis) for sharding."""
  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(
        self.features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=partitioned(self.kernel_init, self.axes),
        bias_init=partitioned(nn.initializers.zeros, self.axes[-1:]), name="dense")(x)


class LayerNorm(nn.Module):
  """Pre-LN normalisation; statistics always in float32 (flax promotes reductions).

  `epsilon`: 1e-6 for mmjax's own models; 1e-5 (torch's default) for converted open_clip
  weights, whose activations are small enough at init that the difference is visible."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.LayerNorm(
        epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
        scale_init=partitioned(nn.initializers.ones, ("embed",)),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="norm")(x)


class Attention(nn.Module):
  """Multi-head attention of `x` [B, T, D] over `context` [B, S, Dc] (self-attention if None).

  `mask`: bool, broadcastable to [B, heads, T, S], True where attention is allowed.
  Softmax runs in float32 inside `jax.nn.dot_product_attention`, which can dispatch to
  cuDNN flash attention on GPUs.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
    context = x if context is None else context
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda name, axes: Dense(width, axes, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)

    def heads(y: jax.Array, name: str) -> jax.Array:
      y = dense(name, ("embed", "heads"))(y).reshape(y.shape[0], y.shape[1], self.num_heads,
                                                     head_dim)
      return constrain(y, ("batch", "length", "heads", "kv"))

    q, k, v = heads(x, "query"), heads(context, "key"), heads(context, "value")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    out = out.reshape(batch, length, width)
    return dense("out", ("heads", "embed"))(out)


class Mlp(nn.Module):
  mlp_dim: int
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
              name="fc1")(x)
    h = constrain(h, ("batch", "length", "mlp"))
    h = nn.gelu(h, approximate=False) if self.activation == "gelu" else quick_gelu(h)
    return Dense(width, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                 name="fc2")(h)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


class TransformerBlock(nn.Module):
  """Pre-LN block: self-attention, optional cross-attention to `context`, MLP.

  Signature `(x, mask, context) -> (x, None)` so `nn.scan` can stack it.
  x: [B, T, D]; mask: bool broadcastable to [B, heads, T, T] or None; context: [B, S, Dc].
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> tuple[jax.Array, None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x, ("batch", "length", "embed"))
    h = LayerNorm(**kw, epsilon=self.norm_eps, name="ln_self")(x)
    # A mask already encodes causality; is_causal alone lets XLA/cuDNN skip the mask tensor.
    x = x + Attention(self.num_heads, **kw, name="self_attn")(
        h, mask=mask, is_causal=self.causal and mask is None)
    if self.cross_attention:
      h = LayerNorm(**kw, epsilon=self.norm_eps, name="ln_cross")(x)
      x = x + Attention(self.num_heads, **kw, name="cross_attn")(h, context)
    h = LayerNorm(**kw, epsilon=self.norm_eps, name="ln_mlp")(x)
    x = x + Mlp(self.mlp_dim, self.activation, **kw, name="mlp")(h)
    return constrain(x, ("batch", "length", "embed")), None


class TransformerStack(nn.Module):
  """`num_layers` TransformerBlocks, scanned (params stacked on a `layers` axis) or unrolled,
  each optionally rematerialised with a named policy from `REMAT_POLICIES`.

  `block`: the layer class (None = TransformerBlock); it must take TransformerBlock's fields
  and call signature (open_clip's multimodal layer is one, see `mmjax.models.text`)."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  activation: str = "gelu"
  scan: bool = True
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  block: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> jax.Array:
    block = self.block or TransformerBlock
    if self.remat_policy != "none":
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"config model.remat_policy={self.remat_policy!r}: choose one of "
                         f"{['none', *REMAT_POLICIES]}")
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy],
                       prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
              cross_attention=self.cross_attention, activation=self.activation,
              dtype=self.dtype, param_dtype=self.param_dtype, norm_eps=self.norm_eps)
    if self.scan:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kw, name="layers")(x, mask, context)
      return x
    for i in range(self.num_layers):
      x, _ = block(**kw, name=f"layers_{i}")(x, mask, context)
    return x
