"""mmjax.evaluators.embedder: one Embedder per run (`for_runtime`), and the programs it runs
lowered for mmjax.aot without reaching into its private attributes."""
import flax.linen as nn
import jax
import numpy as np

import helpers
from mmjax import runtime, state as state_lib
from mmjax.evaluators import Embedder


def test_for_runtime_rounds_the_eval_batch_to_the_batch_parallel_size():
  config = helpers.tiny_config(**{"mesh.shape": (2, 2, 1), "eval_batch_size": 6})
  rt = runtime.build(config, jax.devices()[:4], params_only=True)
  assert Embedder.for_runtime(rt).batch_size == 8  # 6 rounded up to 4 batch devices
  assert Embedder.for_runtime(rt, batch_size=3).batch_size == 4


def test_lowered_programs_are_what_images_and_texts_run():
  config = helpers.tiny_config(**{"eval_batch_size": 4})
  rt = runtime.build(config, jax.devices()[:1], params_only=True)
  embedder = Embedder.for_runtime(rt)
  spec = rt.abstract_batch(embedder.batch_size)
  with rt.activate():  # params_only: the abstract state is the parameters
    image_out = embedder.lower_images(rt.abstract_state, spec["image"]).out_info
    text_out = embedder.lower_texts(rt.abstract_state, spec["text"],
                                    spec["text_type"]).out_info
    params = nn.unbox(jax.jit(rt.model.init)(jax.random.key(0),
                                             *state_lib.dummy_inputs(config))["params"])
  batch = helpers.synthetic_batch(helpers.override(config, batch_size=4))
  images = embedder.images(params, batch["image"])
  texts = embedder.texts(params, batch["text"], batch["text_type"])
  assert image_out.shape == images.shape and text_out.shape == texts.shape
  np.testing.assert_allclose(np.linalg.norm(images, axis=-1), 1.0, rtol=1e-6)
