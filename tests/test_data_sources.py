"""mmjax.data.sources: TFDS datasets read TF-free by name, evaluation splits, mocks, and
the one-line errors naming the config key."""
import sys

import numpy as np
import pytest

import helpers
from configs import schema
from helpers import data_config, take, write_bad_folder
from mmjax import errors
from mmjax.data import tokenizer as tk
from mmjax.data import pipeline, sources


def test_load_eval_split(data_dir):
  """An evaluator's split, read from its config entry (evals.linear_probe: shapes/labels,
  evals.retrieval: shapes/captions; the probe's train_split by split_key)."""
  c = data_config(data_dir)
  e = pipeline.load_eval_split(c, "linear_probe", num_examples=20)  # shapes/labels
  assert e["images"].shape == (20, 64, 64, 3) and e["labels"].shape == (20,)
  assert e["images"].dtype == np.uint8
  assert len(e["class_names"]) == 64
  e2 = pipeline.load_eval_split(c, "linear_probe", num_examples=20)
  np.testing.assert_array_equal(e["images"], e2["images"])
  train = pipeline.load_eval_split(c, "linear_probe", num_examples=20, split_key="train_split")
  assert not np.array_equal(train["images"], e["images"])
  r = pipeline.load_eval_split(c, "retrieval", num_examples=8)  # shapes/captions
  assert len(r["texts"]) == 8 and all(len(t) == 3 for t in r["texts"])


def test_mock_imagenet_and_cifar(tmp_path):
  """Catalog datasets (their real TFDS builders and class lists) under tfds' mock."""
  c = data_config(str(tmp_path))
  c.data.sources = {
      "cifar": schema.source("cifar10", kind="label", label_key="label", weight=0.5),
      "imagenet": schema.source("imagenet2012", kind="label", label_key="label", weight=0.5)}
  with helpers.mock_tfds(num_examples=12):
    tok = tk.get_tokenizer(c)
    names = pipeline.label_texts(c)
    assert len(names) == 1010  # sorted keys: cifar's 10 classes, then imagenet's 1000
    (b,) = take(c, tok, 1)
  assert b["image"].shape == (16, 64, 64, 3)
  cifar, imnet = b["source"] == 0, b["source"] == 1
  assert cifar.any() and imnet.any()
  assert (b["label"][cifar] < 10).all() and (b["label"][imnet] >= 10).all()
  assert (b["label"] < 1010).all() and (b["text_type"] == 1).all()


def test_label_out_of_range_raises(data_dir):
  opened = sources.open_source("shapes/labels", "validation", data_dir, label_key="label")
  opened.class_names = opened.class_names[:1]
  src = sources.CleanSource(opened, key="labels", source_index=0, kind="label",
                            image_key="image", label_key="label")
  idx = next(i for i in range(50) if opened.data_source[i]["label"] > 0)
  with pytest.raises(ValueError, match=f"'labels'.*record {idx}"):
    src[idx]


def test_no_tensorflow():
  assert "tensorflow" not in sys.modules


def test_nested_feature_keys_are_paths():
  record = {"captions": {"text": [b"a cat"]}, "image": 1}
  assert sources.field(record, "captions/text") == [b"a cat"]
  assert sources.field(record, "image") == 1


def test_missing_split_and_feature_name_the_config_key(tmp_path):
  write_bad_folder("no_validation", str(tmp_path))
  c = data_config(str(tmp_path))
  c.evals.zeroshot.dataset = "no_validation"
  with pytest.raises(errors.UsageError, match=r"dataset 'no_validation' has no split "
                     r"'validation' \(config evals.zeroshot.split\); it has train \(.*"
                     r"--val_fraction\)"):
    pipeline.load_eval_split(c, "zeroshot", num_examples=4)
  c.data.sources.captions = schema.source(
      "no_validation", kind="caption", text_key="caption", weight=0.5)
  with pytest.raises(errors.UsageError, match=r"has no text feature 'caption' \(config "
                     r"data.sources.captions.text_key\); its features are \['file_name', "
                     r"'image', 'label'\]"):
    sources.open_train_sources(c)
