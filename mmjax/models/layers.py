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
from jax.ad_checkpoint import checkpoint_name

from mmjax.models.config import Stack

Dtype = Any

# Names of the activations a rematerialisation policy can keep (`checkpoint_name` tags in
# Attention and Mlp; per token and layer, D = width, F = MLP width, H = heads):
QKV_PROJ = "qkv_proj"  # q, k and v after their projections: 3 x D
ATTENTION_CONTEXT = "attention_context"  # softmax(q k^T) v, before the output projection: D
ATTENTION_OUT = "attention_out"  # the attention branch after its output projection: D
MLP_HIDDEN = "mlp_hidden"  # fc1's output, before the activation: F
MLP_OUT = "mlp_out"  # fc2's output, the MLP branch: D
_ATTENTION = (QKV_PROJ, ATTENTION_CONTEXT, ATTENTION_OUT)


def _offload(*names: str) -> Callable:
  """Keep `names` in host memory between forward and backward (copied out after the
  forward, back before the backward); recompute everything else."""
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
      offload_src="device", offload_dst="pinned_host")


# `model.remat_policy`: what each layer keeps for the backward pass ("none": everything,
# no rematerialisation; scanned: SCANNED_NONE_POLICY below). Memory is per token and layer
# besides the layer's input, which every policy keeps; recompute is the backward's extra
# forward work, of the layer's matmul FLOPs (at F = 4 D the attention projections are 1/3,
# the MLP 2/3 of them) plus the attention's own T x T work.
REMAT_POLICIES: dict[str, Callable | None] = {
    # Save nothing: least memory, the whole layer runs twice (+1 forward, ~ +33% FLOPs).
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # the same as "full"
    # Every matmul output, also attention's batched q k^T (T x T per head) and probs x v:
    # no matmul is recomputed, only the elementwise work (norms, activation, softmax).
    "dots": jax.checkpoint_policies.checkpoint_dots,
    # Every weight matmul's output (q, k, v, out, fc1, fc2: 6 D + F); recomputes only the
    # norms, activation and attention softmax. Little recompute, the most memory of these.
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # q, k, v (3 D): recomputes attention, its output projection and the MLP.
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(QKV_PROJ),
    # The attention branch (5 D): recomputes only the MLP (2/3 of the matmuls) — no
    # attention recompute, and the F-wide MLP activations (the largest) are not kept.
    "save_attention_recompute_mlp": jax.checkpoint_policies.save_only_these_names(
        *_ATTENTION),
    # As the two above, the kept activations in host memory instead of device memory: the
    # device keeps only the layer inputs; costs a device-host copy each way per layer
    # (hidden behind compute when the link keeps up). Needs a backend with host memory
    # spaces (TPU, GPU; XLA's CPU backend has no separate host memory: see the tests).
    "offload_qkv_proj": _offload(QKV_PROJ),
    "offload_attention_recompute_mlp": _offload(*_ATTENTION),
}


# `remat_policy="none"` on scanned layers. A scanned stack's backward gets every residual of
# its layers through the loop boundary, where XLA stacks each into a [layers, ...] buffer
# (zero-filled, written by dynamic-update-slice each layer, read back by dynamic-slice): on
# a CPU these copies cost more than the work they save. Unrolled, XLA keeps only matmul
# outputs and fuses the cheap elementwise work (norms, activations, softmax, masks) into
# the backward. Scanned "none" does the same explicitly: keep every matmul output (none is
# recomputed), recompute the elementwise rest (benchmarks/scan_overhead.py measures it).
SCANNED_NONE_POLICY = "dots"


def partitioned(init: Callable, axes: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(axes))


def capped_logit_scale(log_scale: jax.Array, max_scale: float) -> jax.Array:
  """exp(min(log_scale, log max_scale)) [], with the gradient of exp(log_scale) everywhere.

  Why: a plain min has a zero gradient past the cap, so a parameter that crosses it would
  never come back; here the loss keeps acting on it. The optimizers also project the
  parameter under the cap after each update (`mmjax.optimizer.project_logit_scale`).
  """
  excess = jnp.maximum(log_scale - jnp.log(jnp.float32(max_scale)), 0.0)
  return jnp.exp(log_scale - jax.lax.stop_gradient(excess))


class ContrastiveModel(nn.Module):
  """Base of the models with contrastive logits: a learned temperature (parameter
  `logit_scale`, its log) and, with `config.logit_bias`, a learned bias (`logit_bias`, the
  sigmoid losses'). Subclasses call `contrastive_params()` in their setup."""

  def contrastive_params(self) -> None:
    c = self.config
    self.logit_scale_log = self.param(
        "logit_scale", nn.initializers.constant(jnp.log(c.logit_scale_init)), (), jnp.float32)
    if c.logit_bias:
      self.logit_bias_param = self.param(
          "logit_bias", nn.initializers.constant(c.logit_bias_init), (), jnp.float32)

  def logit_scale(self) -> jax.Array:
    """exp of the learned log-scale, at most logit_scale_max; its gradient never stops."""
    return capped_logit_scale(self.logit_scale_log, self.config.logit_scale_max)

  def logit_bias(self) -> jax.Array:
    """The learned logit bias (model.logit_bias), else the constant 0."""
    if self.config.logit_bias:
      return self.logit_bias_param
    return jnp.zeros((), jnp.float32)


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


def norm(stack: Stack, name: str) -> LayerNorm:
  """The stack's LayerNorm (its dtypes and `norm_eps`), named `name`."""
  return LayerNorm(stack.dtype, stack.param_dtype, epsilon=stack.norm_eps, name=name)


# model.attention_impl -> jax.nn.dot_product_attention's `implementation`. "xla": XLA's
# softmax(q k^T) v, which materialises the [B, heads, T, S] logits; "cudnn": cuDNN's fused
# flash attention (NVIDIA GPUs only), which keeps only per-row softmax statistics, for
# every attention whose shapes cuDNN takes (`cudnn_supports`), XLA for the others.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
  """Whether cuDNN flash attention trains on q [B, T, H, Dh] over k [B, S, H, Dh]: bfloat16 or
  float16, head dim a multiple of 8 and <= 128 (256 only on Hopper, which an ahead-of-time
  compile cannot ask the device about), and T and S even: jax's training path checks the
  bias rule "sequence lengths even" even when there is no bias (jax 0.10-0.11,
  cudnn/fused_attention_stablehlo.py), so CoCa's 1-query contrastive pooler and a 63-token
  multimodal decoder stay on XLA."""
  (_, t, _, head_dim), s = q.shape, k.shape[1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
          and t % 2 == 0 and s % 2 == 0)


class Attention(nn.Module):
  """Multi-head attention of `x` [B, T, D] over `context` [B, S, Dc] (self-attention if None).

  `mask`: bool, broadcastable to [B, heads, T, S], True where attention is allowed.
  Softmax runs in float32 inside `jax.nn.dot_product_attention`, which can dispatch to
  cuDNN flash attention on GPUs.

  `decode=True` (autoregressive decoding; no new parameters) keeps K/V in the "cache"
  collection, see `_cached_self_kv` and `_cached_cross_kv`. Self-attention is then causal
  by cache position and `mask`/`is_causal` are ignored; `cross=True` marks cross-attention,
  whose K/V are computed from `context` when it is given and read from the cache when
  `context` is None.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  implementation: str = "xla"  # model.attention_impl: one of ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, is_causal: bool = False,
               cross: bool = False) -> jax.Array:
    if self.decode:
      return self._decode(x, context, cross)
    context = x if context is None else context
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda name, axes: Dense(width, axes, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)

    def heads(y: jax.Array, name: str) -> jax.Array:
      y = dense(name, ("embed", "heads"))(y).reshape(y.shape[0], y.shape[1], self.num_heads,
                                                     head_dim)
      return constrain(y, ("batch", "length", "heads", "kv"))

    q, k, v = (checkpoint_name(y, QKV_PROJ) for y in (
        heads(x, "query"), heads(context, "key"), heads(context, "value")))
    implementation = self.implementation
    if implementation == "cudnn" and not cudnn_supports(q, k):
      implementation = "xla"
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=implementation)
    out = checkpoint_name(out.reshape(batch, length, width), ATTENTION_CONTEXT)
    return checkpoint_name(dense("out", ("heads", "embed"))(out), ATTENTION_OUT)

  # --- decoding (same parameters, K/V in the "cache" collection) ---------------------------
  def _project(self, y: jax.Array, name: str, heads: bool = True) -> jax.Array:
    """The training path's projections (same module names, so the same parameters)."""
    width = y.shape[-1]
    out = Dense(width, ("embed", "heads") if heads else ("heads", "embed"), dtype=self.dtype,
                param_dtype=self.param_dtype, name=name)(y)
    if not heads:
      return out
    out = out.reshape(*y.shape[:2], self.num_heads, width // self.num_heads)
    return constrain(out, ("batch", "length", "heads", "kv"))

  def _decode(self, x: jax.Array, context: jax.Array | None, cross: bool) -> jax.Array:
    """x [B, L, D] -> [B, L, D]. Helpers called from a compact method may define submodules."""
    batch, length, width = x.shape
    q = self._project(x, "query")
    if cross:
      k_t, v, mask = (*self._cached_cross_kv(context), None)
    else:
      k_t, v, mask = self._cached_self_kv(self._project(x, "key"), self._project(x, "value"))
    out = cached_attention(q, k_t, v, mask)
    return self._project(out.reshape(batch, length, width), "out", heads=False)

  def _cached_self_kv(self, k: jax.Array,
                      v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Appends k, v [B, L, H, Dh] at the cache index; returns the whole caches, keys
    [B, H, Dh, S] and values [B, H, S, Dh] (`cache_layout`), and a bool mask [1, 1, L, S]
    (query at position index+i sees cache slots <= index+i).

    Flax's convention: the first call (cache absent) only creates zeroed caches shaped like
    its input, so `decode.init_cache` sizes them with an input of the maximum length S.
    """
    k_t, v = cache_layout(k, v)
    initialised = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_t.shape, k_t.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialised:
      return k_t, v, None
    length, size = v.shape[2], cached_v.value.shape[2]
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice(
        cached_k.value, k_t.astype(cached_k.value.dtype), (0, 0, 0, start))
    cached_v.value = jax.lax.dynamic_update_slice(
        cached_v.value, v.astype(cached_v.value.dtype), (0, 0, start, 0))
    index.value = start + length
    query_pos = start + jnp.arange(length)
    mask = jnp.arange(size)[None, :] <= query_pos[:, None]  # causal; also hides unwritten slots
    return cached_k.value, cached_v.value, mask[None, None]

  def _cached_cross_kv(self, context: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """K/V of `context` [B, S, Dc] in `cache_layout`, computed once per image: stored when
    `context` is given (prefill), read back when it is None (every later step)."""
    if context is None:
      if not self.has_variable("cache", "cross_key"):
        raise ValueError("cross-attention decode step before the prefill stored image K/V")
      return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
    k_t, v = cache_layout(self._project(context, "key"), self._project(context, "value"))
    self.put_variable("cache", "cross_key", k_t)
    self.put_variable("cache", "cross_value", v)
    return k_t, v


def cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """k, v [B, S, H, Dh] -> keys [B, H, Dh, S], values [B, H, S, Dh]: the operand layouts of
  the two batched matmuls of `cached_attention`, so a decode step reads its caches in place
  (stored as [B, S, H, Dh], every step re-transposed every layer's keys: a third of the step
  time on a CPU). The batch axis stays 4th from last, as `decode.reorder_cache` expects."""
  return k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)


def cached_attention(q: jax.Array, k_t: jax.Array, v: jax.Array,
                     mask: jax.Array | None) -> jax.Array:
  """`jax.nn.dot_product_attention` over caches in `cache_layout`: q [B, T, H, Dh], k_t
  [B, H, Dh, S], v [B, H, S, Dh], mask bool broadcastable to [B, H, T, S] -> [B, T, H, Dh].
  Logits and softmax in float32."""
  logits = jnp.einsum("bthd,bhds->bhts", q, k_t, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bhsd->bthd", probs, v)


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
    h = checkpoint_name(constrain(h, ("batch", "length", "mlp")), MLP_HIDDEN)
    h = ACTIVATIONS[self.activation](h)
    return checkpoint_name(Dense(width, ("mlp", "embed"), dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="fc2")(h), MLP_OUT)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# model.activation -> the MLP's nonlinearity. gelu: exact (erf); quick_gelu: OpenAI CLIP's
# sigmoid approximation; gelu_tanh: the tanh approximation (SigLIP, `gelu_pytorch_tanh`).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
}


class TransformerBlock(nn.Module):
  """Pre-LN block: self-attention, optional cross-attention to `context`, MLP.

  Signature `(x, mask, context) -> (x, None)` so `nn.scan` can stack it.
  x: [B, T, D]; mask: bool broadcastable to [B, heads, T, T] or None; context: [B, S, Dc].
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  stack: Stack = Stack()  # activation, dtypes, norm_eps, attention_impl (scan/remat: the stack's)
  decode: bool = False  # K/V caches (see Attention); context None = cached image K/V

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> tuple[jax.Array, None]:
    s = self.stack
    attn = dict(**s.dtypes, decode=self.decode, implementation=s.attention_impl)
    x = constrain(x, ("batch", "length", "embed"))
    h = norm(s, "ln_self")(x)
    # A mask already encodes causality; is_causal alone lets XLA/cuDNN skip the mask tensor.
    x = x + Attention(self.num_heads, **attn, name="self_attn")(
        h, mask=mask, is_causal=self.causal and mask is None)
    if self.cross_attention:
      h = norm(s, "ln_cross")(x)
      x = x + Attention(self.num_heads, **attn, name="cross_attn")(
          h, context, cross=True)
    h = norm(s, "ln_mlp")(x)
    x = x + Mlp(self.mlp_dim, s.activation, **s.dtypes, name="mlp")(h)
    return constrain(x, ("batch", "length", "embed")), None


class TransformerStack(nn.Module):
  """`num_layers` TransformerBlocks, scanned (params stacked on a `layers` axis) or unrolled
  (`stack.scan_layers`), each optionally rematerialised with a named policy from
  `REMAT_POLICIES` (`stack.remat_policy`).

  `block`: the layer class (None = TransformerBlock); it must take TransformerBlock's fields
  and call signature (open_clip's multimodal layer is one, see `mmjax.models.text`)."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  stack: Stack = Stack()
  block: Any = None
  decode: bool = False  # per-layer K/V caches; under scan stacked on the layers axis

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               context: jax.Array | None = None) -> jax.Array:
    block = self.block or TransformerBlock
    scan = self.stack.scan_layers
    policy = self.stack.remat_policy
    if policy == "none" and scan:
      policy = SCANNED_NONE_POLICY
    # Decoding keeps no activations for a backward pass: remat would only add lifting.
    if policy != "none" and not self.decode:
      if policy not in REMAT_POLICIES:
        raise ValueError(f"config model.remat_policy={policy!r}: choose one of "
                         f"{['none', *REMAT_POLICIES]}")
      block = nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=not scan)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
              cross_attention=self.cross_attention, stack=self.stack)
    if self.decode:
      kw["decode"] = True
    if scan:
      # Training sees exactly the old transform; decoding also stacks the caches per layer.
      axes = {"params": 0, "cache": 0} if self.decode else {"params": 0}
      scanned = nn.scan(block, variable_axes=axes, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kw, name="layers")(x, mask, context)
      return x
    for i in range(self.num_layers):
      x, _ = block(**kw, name=f"layers_{i}")(x, mask, context)
    return x


def unstack_layer_params(tree: Any) -> Any:
  """Scanned parameters ({"layers": leaves stacked [n, ...]}) -> the unrolled layout
  ({"layers_0": ..., "layers_{n-1}": ...}) of the same `TransformerStack`s."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers":
      n = jax.tree.leaves(value)[0].shape[0]
      out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], value) for i in range(n)})
    else:
      out[key] = unstack_layer_params(value)
  return out
