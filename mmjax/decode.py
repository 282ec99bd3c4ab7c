"""Autoregressive captioning with a K/V-cached CoCa decoder.

The image side (ViT, captioning pooler and every multimodal layer's cross-attention K/V) is
computed once per image; each new token then runs one position through the unimodal and
multimodal decoder layers, whose self-attention K/V are cached per layer in the Flax
"cache" collection (stacked on the layers axis when the layers are scanned).

  captioner = make_captioner(model, DecodeConfig(strategy="beam", beam_size=4))
  tokens = captioner(params, images, jax.random.key(0))  # int32 [B, max_new_tokens]

Output rows hold the generated tokens (BOS excluded), EOS included where it was produced,
PAD after it. The search loops (`sequential_decode`, `beam_search`) take any step function,
so they are tested without the model as well.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.vocabulary import BOS_ID, CAPTION, EOS_ID, PAD_ID

Cache = Any  # a pytree of arrays; see `reorder_cache` for the layout beam search assumes
# tokens int32 [N] (the last chosen token per row), cache -> (logits float32 [N, V], cache)
StepFn = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]
SelectFn = Callable[[jax.Array, jax.Array], jax.Array]  # logits [N, V], rng -> tokens [N]
STRATEGIES = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to pick tokens. `sample` applies temperature, then top-k (0 = off), then top-p
  (nucleus; 1.0 = off). `beam` ranks finished hypotheses by sum log p / length**alpha.
  bos_id / eos_id / pad_id: the tokenizer's (open_clip's BPE: 49406 / 49407 / 0)."""
  strategy: str = "greedy"
  max_new_tokens: int = 16
  beam_size: int = 4
  length_penalty: float = 1.0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  pad_id: int = PAD_ID

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"decode strategy={self.strategy!r}: choose one of {STRATEGIES}")
    if self.max_new_tokens < 1 or self.beam_size < 1 or self.top_k < 0:
      raise ValueError(f"need max_new_tokens >= 1, beam_size >= 1, top_k >= 0: {self}")
    if self.temperature <= 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"need temperature > 0 and 0 < top_p <= 1: {self}")


# --- token selection ------------------------------------------------------------------------
def greedy_select(logits: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """logits [N, V] -> argmax tokens int32 [N] (ties: lowest id)."""
  del rng
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_select(logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Samples tokens int32 [N] from logits [N, V] after temperature, top-k and top-p.

  Candidates are the k best ids (`lax.top_k`: exactly k, ties to the lowest id, so top_k=1
  is greedy) or all ids sorted by logit; top-p keeps the shortest sorted prefix whose
  probability mass reaches p (always at least the best token).
  """
  logits = logits.astype(jnp.float32) / temperature
  if not top_k and top_p >= 1.0:
    return jax.random.categorical(rng, logits).astype(jnp.int32)
  if top_k:
    values, ids = jax.lax.top_k(logits, top_k)
  else:
    ids = jnp.argsort(-logits, axis=-1)
    values = jnp.take_along_axis(logits, ids, axis=-1)
  if top_p < 1.0:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where(mass_before < top_p, values, -jnp.inf)
  choice = jax.random.categorical(rng, values)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def make_select(config: DecodeConfig) -> SelectFn:
  if config.strategy == "sample":
    return lambda logits, rng: sample_select(logits, rng, temperature=config.temperature,
                                             top_k=config.top_k, top_p=config.top_p)
  return greedy_select


# --- search loops ---------------------------------------------------------------------------
def sequential_decode(first_logits: jax.Array, step_fn: StepFn, cache: Cache, rng: jax.Array,
                      select: SelectFn, *, max_new_tokens: int, eos_id: int = EOS_ID,
                      pad_id: int = PAD_ID) -> jax.Array:
  """Greedy or sampled decoding: one token per row per step until every row emitted EOS or
  `max_new_tokens` were produced.

  first_logits: float [N, V], the prediction after the prompt (BOS). Returns int32
  [N, max_new_tokens]: tokens, EOS where chosen, PAD after it. The token chosen last is
  never fed back, so the cache needs room for the prompt + max_new_tokens - 1 tokens.
  """
  n = first_logits.shape[0]

  def choose(logits, done, step):
    token = select(logits, jax.random.fold_in(rng, step))
    token = jnp.where(done, pad_id, token)
    return token, done | (token == eos_id)

  token, done = choose(first_logits, jnp.zeros((n,), bool), 0)
  tokens = jnp.full((n, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

  def cond(state):
    step, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tokens, done, cache = state
    logits, cache = step_fn(tokens[:, step - 1], cache)
    token, done = choose(logits, done, step)
    return step + 1, tokens.at[:, step].set(token), done, cache

  _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, cache))
  return tokens


def reorder_cache(cache: Cache, rows: jax.Array) -> Cache:
  """Gathers cache rows (beam search's surviving parents). rows: int32 [N].

  K/V leaves are [..., N, H, Dh, S] / [..., N, H, S, Dh] (`layers.cache_layout`; a leading
  layers axis when scanned): batch axis ndim - 4. Lower-rank leaves (cache indices) are shared
  by all rows and kept.
  """
  def gather(x):
    return jnp.take(x, rows, axis=x.ndim - 4) if x.ndim >= 4 else x
  return jax.tree.map(gather, cache)


@dataclasses.dataclass
class _Beams:
  """Beam-search state; B rows of K beams, T = max_new_tokens."""
  alive_tokens: jax.Array  # int32 [B, K, T]
  alive_scores: jax.Array  # float32 [B, K]: sum of log-probs
  finished_tokens: jax.Array  # int32 [B, K, T]
  finished_scores: jax.Array  # float32 [B, K]: length-normalised; -inf = empty slot
  done: jax.Array  # bool [B]: no alive beam can still beat the finished ones


jax.tree_util.register_dataclass(
    _Beams, data_fields=[f.name for f in dataclasses.fields(_Beams)], meta_fields=[])


def beam_search(first_logits: jax.Array, step_fn: StepFn, cache: Cache, *, beam_size: int,
                max_new_tokens: int, length_penalty: float = 1.0, eos_id: int = EOS_ID,
                pad_id: int = PAD_ID,
                reorder: Callable[[Cache, jax.Array], Cache] = reorder_cache,
                ) -> tuple[jax.Array, jax.Array]:
  """Beam search over B rows whose K beams are flattened row-major into N = B * K.

  first_logits: float [N, V] after the prompt (the K copies of a row are identical).
  Each step scores the 2K best continuations of the alive beams. An EOS continuation
  ranked within the top K becomes a finished hypothesis with score
  sum log p / length**length_penalty (length counts EOS) and keeps that score; the K best
  non-EOS continuations stay alive. A row is done once it has K finished hypotheses and
  its best alive beam, normalised at the current length, does not beat the worst of them
  (Hugging Face's heuristic; with K=1 this is exactly greedy). The loop stops when every
  row is done or after `max_new_tokens`; unfinished rows then also consider their alive
  beams. Returns (tokens int32 [B, T] with PAD after EOS, score float32 [B]).
  """
  n, vocab = first_logits.shape
  k, t_max = beam_size, max_new_tokens
  if n % k:
    raise ValueError(f"{n} rows are not a multiple of beam_size={k}")
  if vocab < 2 * k:
    raise ValueError(f"beam search needs vocab >= 2 * beam_size, got {vocab} < {2 * k}")
  b = n // k
  neg_inf = jnp.float32(-jnp.inf)
  empty = jnp.full((b, k, t_max), pad_id, jnp.int32)
  # Only beam 0 is live at first, so the K beams start from K different tokens.
  beams = _Beams(empty, jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf), (b, 1)),
                 empty, jnp.full((b, k), neg_inf), jnp.zeros((b,), bool))

  def normalise(scores, length):
    return scores / jnp.asarray(length, jnp.float32) ** length_penalty

  def expand(beams: _Beams, logits: jax.Array, step: jax.Array) -> tuple[_Beams, jax.Array]:
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, vocab)
    scores = (beams.alive_scores[:, :, None] + log_probs).reshape(b, k * vocab)
    top_scores, top_ids = jax.lax.top_k(scores, 2 * k)  # [B, 2K], best first
    parent, token = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(beams.alive_tokens, parent[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], step, axis=2)
    is_eos = token == eos_id
    # Finished: EOS within the top K ranks, and not for rows already done (they are frozen).
    new_finished = is_eos & (jnp.arange(2 * k) < k) & ~beams.done[:, None]
    pool_scores = jnp.concatenate(
        [beams.finished_scores, jnp.where(new_finished, normalise(top_scores, step + 1),
                                          neg_inf)], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, k)
    pool_tokens = jnp.concatenate([beams.finished_tokens, seqs], axis=1)
    finished_tokens = jnp.take_along_axis(pool_tokens, keep[:, :, None], axis=1)
    # Alive: the K best non-EOS continuations (at most K of the 2K are EOS).
    alive_scores, alive = jax.lax.top_k(jnp.where(is_eos, neg_inf, top_scores), k)
    alive_tokens = jnp.take_along_axis(seqs, alive[:, :, None], axis=1)
    full = finished_scores[:, -1] > neg_inf
    hopeless = normalise(alive_scores[:, 0], step + 1) <= finished_scores[:, -1]
    beams = _Beams(alive_tokens, alive_scores, finished_tokens, finished_scores,
                   beams.done | (full & hopeless))
    rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, alive, axis=1)).reshape(n)
    return beams, rows

  beams, rows = expand(beams, first_logits, jnp.int32(0))
  cache = reorder(cache, rows)

  def cond(state):
    step, beams, _ = state
    return (step < t_max) & ~jnp.all(beams.done)

  def body(state):
    step, beams, cache = state
    logits, cache = step_fn(beams.alive_tokens[:, :, step - 1].reshape(n), cache)
    beams, rows = expand(beams, logits, step)
    return step + 1, beams, reorder(cache, rows)

  steps, beams, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), beams, cache))
  # Rows cut off by max_new_tokens also rank their alive beams (length = steps taken).
  alive = jnp.where(beams.done[:, None], neg_inf, normalise(beams.alive_scores, steps))
  scores = jnp.concatenate([beams.finished_scores, alive], axis=1)
  tokens = jnp.concatenate([beams.finished_tokens, beams.alive_tokens], axis=1)
  best = jnp.argmax(scores, axis=1)
  return (jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0],
          jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0])


# --- CoCa -----------------------------------------------------------------------------------
def init_cache(decoder: nn.Module, params: Any, caption_tokens: jax.Array,
               max_new_tokens: int, bos_id: int = BOS_ID) -> Cache:
  """Zeroed caches for `decoder` (a CoCa with decode=True) and N = caption_tokens.shape[0]
  rows: self-attention K/V of prefix + max_new_tokens positions, image K/V, indices.

  Shapes come from `jax.eval_shape` of a prefill at full length (Flax's convention: the
  first decode call sizes the caches), so nothing runs but the zeros.
  """
  n = caption_tokens.shape[0]

  def shapes(params, caption_tokens):
    tokens = jnp.full((n, max_new_tokens), bos_id, jnp.int32)
    text_type = jnp.full((n,), CAPTION, jnp.int32)
    _, variables = decoder.apply({"params": params}, caption_tokens, tokens, text_type,
                                 method="decode_prefill", mutable=["cache"])
    return variables["cache"]

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      jax.eval_shape(shapes, params, caption_tokens))


def decode_from_image_tokens(model: nn.Module, params: Any, caption_tokens: jax.Array,
                             config: DecodeConfig, rng: jax.Array | None = None) -> jax.Array:
  """caption_tokens [B, Q, D] (from `encode_image`) -> tokens int32 [B, max_new_tokens]."""
  max_len = model.config.max_text_len - 1
  if config.max_new_tokens > max_len:
    raise ValueError(f"max_new_tokens={config.max_new_tokens} exceeds the {max_len} text "
                     "positions the model was built with (data.max_text_len - 1)")
  decoder = model.clone(decode=True)
  beam = config.strategy == "beam"
  if beam:  # K rows per image; the image side itself was computed once per image
    caption_tokens = jnp.repeat(caption_tokens, config.beam_size, axis=0)
  n = caption_tokens.shape[0]
  cache = init_cache(decoder, params, caption_tokens, config.max_new_tokens, config.bos_id)
  bos = jnp.full((n, 1), config.bos_id, jnp.int32)
  text_type = jnp.full((n,), CAPTION, jnp.int32)
  logits, variables = decoder.apply({"params": params, "cache": cache}, caption_tokens, bos,
                                    text_type, method="decode_prefill", mutable=["cache"])

  def step_fn(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    logits, variables = decoder.apply({"params": params, "cache": cache}, tokens[:, None],
                                      method="decode_step", mutable=["cache"])
    return logits[:, -1], variables["cache"]

  if beam:
    tokens, _ = beam_search(logits[:, -1], step_fn, variables["cache"],
                            beam_size=config.beam_size, max_new_tokens=config.max_new_tokens,
                            length_penalty=config.length_penalty, eos_id=config.eos_id,
                            pad_id=config.pad_id)
    return tokens
  rng = jax.random.key(0) if rng is None else rng
  return sequential_decode(logits[:, -1], step_fn, variables["cache"], rng,
                           make_select(config), max_new_tokens=config.max_new_tokens,
                           eos_id=config.eos_id, pad_id=config.pad_id)


def make_captioner(model: nn.Module, config: DecodeConfig
                   ) -> Callable[[Any, jax.Array, jax.Array | None], jax.Array]:
  """A jitted `(params, images [B, H, W, 3], rng) -> tokens int32 [B, max_new_tokens]`.

  A model trained with scanned layers decodes with unrolled ones (its parameters unstacked
  once per call): a scanned stack slices every layer's weights out of the stacked arrays at
  every step, a copy of the whole decoder per token.
  """
  if model.config.scan_layers:
    model = model.clone(config=dataclasses.replace(model.config, scan_layers=False))
    prepare = layers.unstack_layer_params
  else:
    prepare = lambda params: params

  def generate(params: Any, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    params = prepare(params)
    _, caption_tokens = model.apply({"params": params}, images, method="encode_image")
    return decode_from_image_tokens(model, params, caption_tokens, config, rng)
  return jax.jit(generate)


def uncached_greedy(model: nn.Module, params: Any, images: jax.Array, max_new_tokens: int,
                    *, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                    pad_id: int = PAD_ID) -> jax.Array:
  """Reference greedy decoding without a cache (jit it): every step re-runs both text
  decoders, through the training forward pass, on the whole sequence so far and takes the
  argmax at its last position. The sequence is padded to the model's fixed text length
  (one compiled program); causality keeps the padding from affecting earlier positions.
  Same output format as `sequential_decode`.
  """
  length = model.config.max_text_len
  if max_new_tokens > length - 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} > data.max_text_len - 1")
  _, caption_tokens = model.apply({"params": params}, images, method="encode_image")
  n = images.shape[0]
  text_type = jnp.full((n,), CAPTION, jnp.int32)

  def last_logits(text_ids: jax.Array, step: jax.Array) -> jax.Array:
    def full(module, text_ids, text_type):
      _, features = module.encode_text_tokens(text_ids, text_type)
      return module.caption_logits(features, caption_tokens)
    logits = model.apply({"params": params}, text_ids, text_type, method=full)
    return jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False)

  def body(step, state):
    text_ids, done = state
    token = jnp.where(done, pad_id, greedy_select(last_logits(text_ids, step)))
    return text_ids.at[:, step + 1].set(token), done | (token == eos_id)

  text_ids = jnp.full((n, length), pad_id, jnp.int32).at[:, 0].set(bos_id)
  text_ids, _ = jax.lax.fori_loop(0, max_new_tokens, body, (text_ids, jnp.zeros((n,), bool)))
  return text_ids[:, 1:max_new_tokens + 1]
