"""mmjax.load (mmjax.inference) on a trained tiny CoCa and an initialised FLAVA: docs/api.md
run as written, inputs of every kind, zero-shot prompts as the evaluator builds them, no
recompilation per call, and the errors a user meets."""
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

import helpers
import mmjax
from conftest import REPO
from mmjax import checkpoint, errors, evaluators, runtime
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import transforms
from mmjax.evaluators import zeroshot
from mmjax.tokenizers import sentencepiece


@pytest.fixture(scope="module")
def model(tiny_workdir):
  return mmjax.load(tiny_workdir)


def test_docs_api_page_runs_as_written(tiny_workdir, tmp_path, monkeypatch):
  with open(os.path.join(REPO, "docs", "api.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) >= 7
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for block in blocks:  # the one substitution: the trained checkpoint's folder
    exec(compile(block.replace("/tmp/mmjax_shapes", tiny_workdir).replace(
        "/tmp/coffee.jpg", str(tmp_path / "coffee.jpg")), "docs/api.md", "exec"), namespace)
  assert namespace["model"].step == 10


def test_import_mmjax_does_not_import_jax():
  proc = helpers.call([sys.executable, "-c",
                       "import sys, mmjax; assert 'jax' not in sys.modules; "
                       "assert callable(mmjax.load); assert 'jax' in sys.modules"])
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_image_kind_gives_the_same_pixels(model, tmp_path):
  photo = skimage.data.chelsea()
  path = tmp_path / "cat.png"
  Image.fromarray(photo).save(path)
  rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 255, np.uint8)], axis=-1)
  kinds = [photo, Image.fromarray(photo), str(path), path, rgba, photo[None]]
  expected = transforms.center_crop_resize(photo, model.config.data.image_size)
  for kind in kinds:
    np.testing.assert_array_equal(model.preprocess(kind)[0], expected)
  grey = skimage.data.camera()
  np.testing.assert_array_equal(model.preprocess(grey)[0],
                                model.preprocess(np.repeat(grey[..., None], 3, -1))[0])
  with pytest.raises(TypeError, match="uint8"):
    model.preprocess(photo.astype(np.float32))
  with pytest.raises(FileNotFoundError, match="no such file"):
    model.preprocess(str(tmp_path / "missing.jpg"))
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  with pytest.raises(ValueError, match="broken.jpg"):
    model.encode_image([photo, str(tmp_path / "broken.jpg")])


def test_embeddings_match_the_evaluators_embedder(model):
  """encode_image / encode_text are the evaluators' embeddings of the same pixels and
  tokens (any padding), as float32."""
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket()]
  embedder = evaluators.Embedder(model.module, model.mesh, model.config.mesh.rules, 16)
  expected = embedder.images(model.params, model.preprocess(photos))
  got = model.encode_image(photos)
  assert got.dtype == np.float32 and got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=2e-6)
  texts = ["a red circle", "a large blue square below a small star"]
  tokens = model.tokenizer.encode(texts, model.config.data.max_text_len)
  expected = embedder.texts(model.params, tokens, np.ones(2, np.int32))
  np.testing.assert_allclose(model.encode_text(texts, prefix="label"), expected, atol=2e-6)
  assert not np.allclose(model.encode_text(texts, prefix="caption"), expected, atol=1e-3)


def test_classify_builds_the_zero_shot_evaluators_class_embeddings(model):
  photos = [skimage.data.astronaut(), skimage.data.chelsea()]
  names, templates = ["red circle", "blue star", "green ring"], ["a {}.", "a photo of a {}."]
  probs = model.classify(photos, names, templates=templates)
  # float64 NumPy reference: prompts class-major, template embeddings averaged, softmax.
  prompts = [t.format(n) for n in names for t in templates]
  assert zeroshot.class_prompts(names, templates) == prompts
  text = model.encode_text(prompts, model.config.evals.zeroshot.prefix).astype(np.float64)
  classes = text.reshape(3, 2, -1).mean(1)
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  logits = model._logit_scale * model.encode_image(photos).astype(np.float64) @ classes.T
  expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(probs, expected, rtol=1e-4)
  with pytest.raises(ValueError, match="exactly one"):
    model.classify(photos, names, templates=["no placeholder"])


def test_calls_of_any_length_reuse_the_compiled_programs(model):
  lowered = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: lowered.append(event)
      if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
  photo = skimage.data.coffee()
  for n in (1, 9, 70):  # one call per batch size (70: chunks of the largest)
    model.encode_image([photo] * n)
    model.encode_text(["a red circle"] * n)
  model.caption([photo] * 2, strategy="greedy")
  lowered.clear()
  for n in (2, 3, 5, 7, 8, 10, 33, 64, 65, 130):
    assert model.encode_image([photo] * n).shape[0] == n
    assert model.encode_text(["a blue star"] * n).shape[0] == n
  model.classify([photo] * 3, ["a", "b", "c", "d"])
  model.similarity([photo] * 4, ["x", "y"])
  assert len(model.caption([photo] * 5, strategy="greedy")) == 5
  assert lowered == []


def test_config_overrides_and_step_folders(tiny_workdir):
  step5 = mmjax.load(os.path.join(tiny_workdir, "checkpoints", "5"))
  assert step5.step == 5
  one_device = mmjax.load(tiny_workdir, config={"mesh.shape": (1, 1, 1)}, step=10)
  assert one_device.mesh.devices.size == 1 and one_device.batch_sizes == (1, 8, 64)
  with pytest.raises(errors.UsageError, match="step 7"):
    mmjax.load(tiny_workdir, step=7)
  with pytest.raises(errors.UsageError, match="no checkpoint"):
    mmjax.load(os.path.join(tiny_workdir, "nowhere"))
  with pytest.raises(errors.UsageError, match="EMA"):
    mmjax.load(tiny_workdir, ema=True)


def test_a_copied_workdir_loads_without_its_data(tiny_workdir, tmp_path, monkeypatch, model):
  copy = tmp_path / "copy"
  shutil.copytree(tiny_workdir, copy)
  # The stored config's data_dir does not exist here: nothing may read it.
  loaded = mmjax.load(str(copy), config={"data_dir": str(tmp_path / "no_data")})
  photo = skimage.data.rocket()
  np.testing.assert_array_equal(loaded.encode_image(photo), model.encode_image(photo))
  assert loaded.caption(photo, strategy="greedy") == model.caption(photo, strategy="greedy")
  assert not (tmp_path / "no_data").exists()


def test_ema_weights_load_with_ema_true(tmp_path):
  config = helpers.tiny_config(**{"optimizer.ema_decay": 0.9})
  rt = runtime.build(config, jax.devices()[:1])
  with rt.activate():
    state = rt.init_state()
  state = state.replace(ema_params=jax.tree.map(lambda x: x * 0.5, state.params))
  tokenizer = sentencepiece.train_tokenizer(["a red circle", "a blue star"] * 10, 40)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  ckpt.save(0, state, config, assets=tokenizer_lib.checkpoint_assets(tokenizer))
  ckpt.close()
  plain, ema = mmjax.load(str(tmp_path)), mmjax.load(str(tmp_path), ema=True)
  for p, e in zip(jax.tree.leaves(plain.params), jax.tree.leaves(ema.params)):
    np.testing.assert_array_equal(np.asarray(e), np.asarray(p) * 0.5)


@pytest.fixture(scope="module")
def flava_workdir(tmp_path_factory):
  """A FLAVA tiny checkpoint with initialised parameters and a tokenizer of its own."""
  config = helpers.flava_config()
  workdir = str(tmp_path_factory.mktemp("flava") / "run")
  rt = runtime.build(config)
  with rt.activate():
    state = rt.init_state()
  tokenizer = sentencepiece.train_tokenizer(
      [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "star")] * 10,
      config.data.tokenizer.vocab_size)
  ckpt = checkpoint.Checkpointer(workdir, config)
  ckpt.save(0, state, config, assets=tokenizer_lib.checkpoint_assets(tokenizer))
  ckpt.close()
  return workdir


def test_flava_embeds_classifies_and_says_it_cannot_caption(flava_workdir):
  model = mmjax.load(flava_workdir)
  photos = [skimage.data.astronaut(), skimage.data.coffee()]
  assert model.encode_image(photos).shape == (2, model.config.model.embed_dim)
  assert model.similarity(photos, ["a red circle"]).shape == (2, 1)
  np.testing.assert_allclose(model.classify(photos, ["red circle", "blue star"]).sum(1), 1,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="no captioning decoder"):
    model.caption(photos)
