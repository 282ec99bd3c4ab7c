"""K/V-cached captioning: equality with full recomputation, strategy equivalences, and the
search loops on toy step functions (cheap to compile). Every model function is jitted once
per test: eager applies would compile every primitive on its own."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import openclip as openclip_configs
from mmjax import decode, models, vocabulary
from mmjax.evaluators import captioning, grid as grid_lib
from mmjax.models import layers

EOS, PAD = vocabulary.EOS_ID, vocabulary.PAD_ID
MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny():
  """(config, model, params, images [4, H, W, 3]) of the tiny CoCa, random init."""
  config = helpers.tiny_config()
  batch = helpers.synthetic_batch(config)
  model = models.build_model(config)
  init = jax.jit(lambda b: flax.linen.unbox(
      model.init(jax.random.key(0), b["image"], b["text"], b["text_type"])["params"]))
  return config, model, init(batch), batch["image"][:4]


def caption(model, params, images, **kw):
  return np.asarray(decode.make_captioner(model, decode.DecodeConfig(
      max_new_tokens=MAX_NEW, **kw))(params, images, jax.random.key(1)))


@pytest.fixture(scope="module")
def greedy(tiny):
  _, model, params, images = tiny
  return caption(model, params, images)


def test_cached_greedy_equals_uncached_recomputation(tiny, greedy):
  _, model, params, images = tiny
  reference = jax.jit(decode.uncached_greedy, static_argnums=(0, 3))(model, params, images,
                                                                     MAX_NEW)
  np.testing.assert_array_equal(greedy, np.asarray(reference))
  assert len(np.unique(greedy)) > 2  # not a degenerate constant output


def test_other_tokenizer_ids_start_from_their_bos(tiny, greedy):
  """Converted open_clip models decode from BOS 49406 to EOS 49407: the ids are the config's,
  cached and uncached agree, and another BOS changes the output."""
  _, model, params, images = tiny
  ids = dict(bos_id=5, eos_id=7, pad_id=0)
  cached = caption(model, params, images, **ids)
  reference = jax.jit(functools.partial(decode.uncached_greedy, **ids),
                      static_argnums=(0, 3))(model, params, images, MAX_NEW)
  np.testing.assert_array_equal(cached, np.asarray(reference))
  assert not np.array_equal(cached, greedy)


def test_openclip_multimodal_block_decodes_with_the_cache():
  """open_clip's layer layout (configs/openclip.py, converted weights) decodes with K/V
  caches too: cached greedy equals recomputation, with open_clip's BOS/EOS ids."""
  config = openclip_configs.get_config("coca_tiny")
  model = models.build_model(config)
  size, length = config.data.image_size, config.data.max_text_len
  images = jax.random.uniform(jax.random.key(2), (3, size, size, 3), minval=-1, maxval=1)
  params = jax.jit(lambda x: flax.linen.unbox(model.init(
      jax.random.key(0), x, jnp.full((3, length), 5, jnp.int32),
      jnp.zeros((3,), jnp.int32))["params"]))(images)
  ids = dict(bos_id=49406, eos_id=49407, pad_id=0)
  cached = caption(model, params, images, **ids)
  reference = jax.jit(functools.partial(decode.uncached_greedy, **ids),
                      static_argnums=(0, 3))(model, params, images, MAX_NEW)
  np.testing.assert_array_equal(cached, np.asarray(reference))
  assert len(np.unique(cached)) > 2


def test_beam_size_1_equals_greedy(tiny, greedy):
  _, model, params, images = tiny
  np.testing.assert_array_equal(caption(model, params, images, strategy="beam", beam_size=1,
                                        length_penalty=1.0), greedy)


def test_top_k_1_sampling_equals_greedy(tiny, greedy):
  _, model, params, images = tiny
  np.testing.assert_array_equal(caption(model, params, images, strategy="sample", top_k=1,
                                        temperature=0.7), greedy)


def test_beam_search_same_with_scanned_and_unrolled_layers(tiny):
  """Cache reordering handles both layouts: stacked [layers, N, ...] and per-layer [N, ...]."""
  _, model, params, images = tiny
  unrolled = models.build_model(helpers.tiny_config(**{"model.scan_layers": False}))
  kw = dict(strategy="beam", beam_size=3)
  unstacked = layers.unstack_layer_params(params)
  np.testing.assert_array_equal(caption(unrolled, unstacked, images, **kw),
                                caption(model, params, images, **kw))


def test_max_new_tokens_is_bounded_by_trained_positions(tiny):
  config, model, params, images = tiny
  with pytest.raises(ValueError, match="max_new_tokens"):
    decode.make_captioner(model, decode.DecodeConfig(
        max_new_tokens=config.data.max_text_len))(params, images)


# --- search loops on a toy Markov "model": logits = table[last token] ----------------------
def markov(table: np.ndarray, calls: list | None = None) -> decode.StepFn:
  """A step function whose log-probs depend on the last token only (cache: unused)."""
  table = jnp.asarray(table, jnp.float32)

  def step_fn(tokens, cache):
    if calls is not None:
      jax.debug.callback(lambda: calls.append(1))
    return table[tokens], cache
  return step_fn


def log_probs(vocab: int, rows: dict[int, dict[int, float]]) -> np.ndarray:
  """[vocab, vocab] log-probabilities: rows[a][b] = p(b | a); the rest share what is left."""
  table = np.zeros((vocab, vocab))
  for a in range(vocab):
    given = rows.get(a, {})
    rest = (1 - sum(given.values())) / (vocab - len(given))
    table[a] = rest
    for b, p in given.items():
      table[a, b] = p
  return np.log(table)


def test_sequential_decode_stops_at_eos_pads_after_and_exits_early():
  vocab = 8  # 2 -> 3 -> 4 -> 5 -> EOS; rows start at 4, 5 and 3
  table = log_probs(vocab, {2: {3: .9}, 3: {4: .9}, 4: {5: .9}, 5: {EOS: .9}})
  first = jnp.asarray(table[[3, 4, 1]])  # argmax 4, 5, 2 (table[1] is flat: argmax 0 = PAD)
  first = first.at[2].set(table[3][::-1])  # argmax of reversed row 3 is 7 - 4 = 3
  calls = []
  tokens = jax.jit(lambda f: decode.sequential_decode(
      f, markov(table, calls), jnp.int32(0), jax.random.key(0), decode.greedy_select,
      max_new_tokens=10))(first)
  np.testing.assert_array_equal(np.asarray(tokens), [
      [4, 5, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
      [5, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
      [3, 4, 5, EOS, PAD, PAD, PAD, PAD, PAD, PAD]])
  assert len(calls) == 3  # the loop stopped once every row had emitted EOS


@functools.partial(jax.jit, static_argnames=("beam_size", "length_penalty"))
def toy_beam(first, table, beam_size, length_penalty):
  first = jnp.repeat(first[None], beam_size, axis=0)  # one row of K identical beams
  return decode.beam_search(first, markov(table), jnp.int32(0), beam_size=beam_size,
                            max_new_tokens=6, length_penalty=length_penalty)


def test_beam_search_finds_the_likelier_sequence_greedy_misses():
  vocab = 10  # greedy takes 4 (p .55), after which every token has p .1; 5 then EOS wins
  table = log_probs(vocab, {0: {4: .55, 5: .4}, 5: {EOS: .9}})
  tokens, score = toy_beam(jnp.asarray(table[0]), jnp.asarray(table), 2, 0.0)
  np.testing.assert_array_equal(np.asarray(tokens), [[5, EOS, PAD, PAD, PAD, PAD]])
  np.testing.assert_allclose(np.asarray(score), [np.log(.4 * .9)], rtol=1e-6)
  greedy, _ = toy_beam(jnp.asarray(table[0]), jnp.asarray(table), 1, 0.0)
  assert np.asarray(greedy)[0, 0] == 4


def test_length_penalty_trades_score_for_length_and_finished_beams_keep_scores():
  vocab = 10  # [EOS]: log .5 at length 1; [6, EOS]: log(.45 * .95) at length 2
  table = log_probs(vocab, {0: {EOS: .5, 6: .45}, 6: {EOS: .95}})
  short, s0 = toy_beam(jnp.asarray(table[0]), jnp.asarray(table), 2, 0.0)
  longer, s1 = toy_beam(jnp.asarray(table[0]), jnp.asarray(table), 2, 1.0)
  np.testing.assert_array_equal(np.asarray(short)[0, :2], [EOS, PAD])
  np.testing.assert_array_equal(np.asarray(longer)[0, :3], [6, EOS, PAD])
  np.testing.assert_allclose(np.asarray(s0), [np.log(.5)], rtol=1e-6)  # found at step 0
  np.testing.assert_allclose(np.asarray(s1), [np.log(.45 * .95) / 2], rtol=1e-6)


def test_sampling_respects_top_k_top_p_and_temperature():
  logits = jnp.log(jnp.array([[.05, .4, .3, .2, .05]] * 2000))
  sample = jax.jit(decode.sample_select, static_argnames=("temperature", "top_k", "top_p"))
  rng = jax.random.key(0)
  top2 = np.asarray(sample(logits, rng, top_k=2))
  assert set(top2) == {1, 2} and abs((top2 == 1).mean() - .4 / .7) < .05
  nucleus = np.asarray(sample(logits, rng, top_p=0.75))  # .4 + .3 reaches .7 < .75: add .2
  assert set(nucleus) == {1, 2, 3}
  cold = np.asarray(sample(logits, rng, temperature=0.05))
  assert (cold == 1).mean() > .99
  everything = np.asarray(sample(logits, rng))
  assert set(everything) == {0, 1, 2, 3, 4}


# --- captioning metrics and the sample grid (pure Python / PIL) ------------------------------
def test_caption_scores_use_pycocoevalcap_on_python_tokenised_text():
  refs = [["A red circle above a blue square.", "a red circle is above a blue square"],
          ["Two small yellow stars, left of a ring!", "a yellow star left of a ring"]]
  assert captioning.caption_words("A red circle, ABOVE it's") == "a red circle above it's"
  perfect = captioning.caption_scores(["a red circle above a blue square",
                                     "a yellow star left of a ring"], refs)
  wrong = captioning.caption_scores(["green", "purple hexagon"], refs)
  assert perfect["bleu4"] > 0.9 and perfect["cider"] > 1.0
  assert wrong["bleu4"] < 1e-3 and wrong["cider"] < 0.1


def test_render_grid_places_every_image_with_its_text():
  images = np.linspace(0, 255, 5 * 8 * 8 * 3).reshape(5, 8, 8, 3).astype(np.uint8)
  grid = grid_lib.render_grid(images, ["a red circle above a blue square"] * 5,
                                  [["red circle", "blue square", "red ring"]] * 5, scale=4)
  assert grid.dtype == np.uint8 and grid.shape[2] == 3
  assert grid.shape[1] == 3 * (32 + 12) and grid.shape[0] > 2 * (32 + 12)  # 3 x 2 cells
  np.testing.assert_array_equal(grid[6, 6], images[0, 0, 0])
  np.testing.assert_array_equal(grid[6 + 4 * 7, 6 + 4 * 7], images[0, 7, 7])
