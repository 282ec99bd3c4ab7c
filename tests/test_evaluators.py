"""mmjax.evaluators plumbing that needs no model (the evaluators run in test_train and
test_objectives_flava, the probe's maths and features in test_linear_probe)."""
import numpy as np
import tensorflow_datasets as tfds

import helpers
from configs import schema
from configs import shapes as shapes_config
from mmjax import evaluators, vocabulary
from mmjax.data import shapes
from mmjax.evaluators import embedder as embedder_lib
from mmjax.evaluators.zeroshot import ZeroShot


def test_format_results_keeps_small_values_readable():
  table = evaluators.format_results({"probe/top1": 0.236, "probe/lambda": 1e-5, "r1": 0.0})
  assert table.splitlines() == ["probe/lambda  1e-05", "probe/top1    0.2360",
                                "r1            0.0000"]


class _Fake(evaluators.Evaluator):
  """The evaluators' base (config entry, metric names) without loading any data."""

  def __init__(self, key, config, tokenizer):
    del tokenizer
    super().__init__(key, config)
    self.built = (self.name.split("/")[0], self.entry.type, self.entry.dataset)


def _fakes(monkeypatch):
  fakes = {t: type(t, (_Fake,), {"METRIC_PREFIX": cls.METRIC_PREFIX})
           for t, cls in evaluators.EVALUATORS.items()}
  monkeypatch.setattr(evaluators, "EVALUATORS", fakes)


def test_an_evaluator_with_zero_examples_is_off(monkeypatch):
  _fakes(monkeypatch)
  config = helpers.tiny_config()
  built = [e.built[0] for e in evaluators.build_evaluators(config, None)]
  assert built == ["caption", "linear_probe", "retrieval", "seen_classes", "zeroshot"]
  config = helpers.tiny_config(**{"evals.captioning.num_examples": 0,
                                  "evals.linear_probe.num_examples": 0,
                                  "evals.seen_classes.num_examples": 0})
  assert [e.built[0] for e in evaluators.build_evaluators(config, None)] == [
      "retrieval", "zeroshot"]


def test_several_evaluators_of_one_type_get_their_key_as_metric_prefix(monkeypatch):
  _fakes(monkeypatch)
  config = helpers.tiny_config()
  config.unlock()
  config.evals.zeroshot_captions = schema.zeroshot_eval("shapes/captions_as_labels")
  config.lock()
  built = {e.built for e in evaluators.build_evaluators(config, None)}
  assert ("zeroshot", "zeroshot", "shapes/labels_unseen") in built
  assert ("seen_classes", "zeroshot", "shapes/labels_seen") in built
  assert ("zeroshot_captions", "zeroshot", "shapes/captions_as_labels") in built


class _PromptIndexTokenizer:
  """Encodes each text as [its index in `texts`]: prompts stay identifiable without a
  trained tokenizer."""

  def __init__(self):
    self.texts = []

  def encode(self, texts, max_len):
    del max_len
    self.texts += texts
    return np.arange(len(self.texts) - len(texts), len(self.texts), dtype=np.int32)[:, None]


class _Oracle:
  """An embedder that knows every image's true class (by its pixels) and every prompt's
  class: one-hot embeddings over the 64 shapes classes. A zero-shot evaluator scores 1.0
  with it exactly when its images, labels and class prompts belong together."""

  def __init__(self, truth, tokenizer):
    self.truth, self.tokenizer, self.seen_images = truth, tokenizer, []

  @staticmethod
  def one_hot(names):
    return np.eye(64)[[shapes.CLASS_NAMES.index(n) for n in names]]

  def images(self, params, images):
    del params
    assert images.dtype == np.uint8  # evaluation images are pixels, as training batches
    keys = [x.tobytes() for x in images]
    self.seen_images += keys
    return self.one_hot([self.truth[k] for k in keys])

  def image_batches(self, params, split, progress=""):
    del progress
    rows = split.rows(range(len(split)))
    yield self.images(params, rows["images"]), rows["labels"]

  def texts(self, params, tokens, text_type):
    del params, text_type
    prompts = [self.tokenizer.texts[i] for i in tokens[:, 0]]
    return self.one_hot([next(n for n in shapes.CLASS_NAMES if n in p) for p in prompts])


def _pixels_to_class(name, split, data_dir):
  """{image bytes (uint8 pixels, as the evaluators see a 64 px image): class name}, read
  with TFDS and Pillow directly."""
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  names = src.dataset_info.features["label"].names
  out = {}
  for i in range(len(src)):
    ex = src[i]
    out[np.asarray(ex["image"], np.uint8).tobytes()] = names[int(ex["label"])]
  return out


def test_seen_and_unseen_zero_shot_read_their_own_images_and_classes(data_dir):
  config = helpers.override(shapes_config.get_config(), data_dir=data_dir)
  tokenizer = _PromptIndexTokenizer()
  seen = ZeroShot("seen_classes", config, tokenizer)
  unseen = ZeroShot("zeroshot", config, tokenizer)
  assert seen.class_names == list(shapes.SEEN_CLASS_NAMES)
  assert unseen.class_names == list(shapes.UNSEEN_CLASS_NAMES)
  assert (len(seen.images), len(unseen.images)) == (500, 1000)
  assert (seen.text_type == vocabulary.CAPTION).all()  # the paper's prefix by default
  seen_truth = _pixels_to_class("shapes/labels_seen", "validation", data_dir)
  unseen_truth = _pixels_to_class("shapes/labels_unseen", "validation", data_dir)
  assert not set(seen_truth) & set(unseen_truth)
  oracle = _Oracle({**seen_truth, **unseen_truth}, tokenizer)
  assert unseen(oracle, None) == {"zeroshot/shapes_labels_unseen/top1": 1.0,
                                  "zeroshot/shapes_labels_unseen/top5": 1.0,
                                  "zeroshot/shapes_labels_unseen/mean_per_class_recall": 1.0}
  assert sorted(oracle.seen_images) == sorted(unseen_truth)  # every held-out image, no other
  oracle.seen_images = []
  assert seen(oracle, None) == {"seen_classes/shapes_labels_seen/top1": 1.0,
                                "seen_classes/shapes_labels_seen/top5": 1.0,
                                "seen_classes/shapes_labels_seen/mean_per_class_recall": 1.0}
  assert sorted(oracle.seen_images) == sorted(seen_truth)
  # The label prefix at test is one override away, per evaluator.
  helpers.override(config, **{"evals.zeroshot.prefix": "label"})
  assert (ZeroShot("zeroshot", config, tokenizer).text_type == vocabulary.LABEL).all()


def test_progress_lines_name_the_task_and_stay_silent_for_short_work(monkeypatch, capsys):
  clock = [0.0]
  monkeypatch.setattr(embedder_lib.time, "monotonic", lambda: clock[0])
  short = embedder_lib.ProgressLine("zeroshot/x images", 100, quiet_s=10)
  for clock[0], done in ((5, 50), (8, 100)):
    short.update(done)
  assert capsys.readouterr().out == ""
  clock[0] = 0.0
  long = embedder_lib.ProgressLine("zeroshot/x images", 100, quiet_s=10)
  for clock[0], done in ((12, 30), (15, 60), (20, 100)):
    long.update(done)
  assert capsys.readouterr().out.splitlines() == [
      "zeroshot/x images: 30/100 (30%), 2.5 images/s, ETA 0m28s",
      "zeroshot/x images: 100/100 (100%), 5.0 images/s, ETA 0m00s"]


def test_run_evaluators_names_each_evaluator_in_its_progress_lines():
  class Recorder:
    def __init__(self, name):
      self.name = name

    def __call__(self, embedder, params):
      return {self.name: embedder.task}

  embedder = embedder_lib.Embedder.__new__(embedder_lib.Embedder)
  embedder.task = ""
  results = evaluators.run_evaluators([Recorder("zeroshot/a"), Recorder("retrieval/b")],
                                      embedder, params=None)
  assert results == {"zeroshot/a": "zeroshot/a", "retrieval/b": "retrieval/b"}
  assert embedder.task == ""
