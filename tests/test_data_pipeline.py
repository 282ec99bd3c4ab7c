"""mmjax.data.pipeline: Grain batches, deterministic and independent of the process count,
resumable, mixed by weight, bad records substituted and counted; FLAVA's modality views and
unimodal phase."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers
from configs import schema
from helpers import data_config, take, write_bad_folder
from mmjax import cli, errors, objectives, vocabulary
from mmjax.data import tokenizer as tk
from mmjax.data import pipeline, shapes


@pytest.fixture(scope="session")
def tokenizer(data_dir):
  return tk.get_tokenizer(data_config(data_dir))


def test_batch_fields(data_dir, tokenizer):
  c = data_config(data_dir)
  (b,) = take(c, tokenizer, 1)
  assert b["image"].shape == (16, 64, 64, 3) and b["image"].dtype == np.uint8
  assert b["image"].std() > 10  # pixels 0..255, not a constant
  assert b["text"].shape == (16, 24) and b["text"].dtype == np.int32
  assert (b["text"][:, 0] == vocabulary.BOS_ID).all()
  assert ((b["text"] == vocabulary.EOS_ID).sum(1) == 1).all()
  for k in ("label", "text_type", "source", "skipped"):
    assert b[k].shape == (16,) and b[k].dtype == np.int32
  # sorted keys: captions=0, labels=1
  is_label = b["source"] == 1
  assert (b["text_type"] == is_label).all()
  assert ((b["label"] >= 0) & (b["label"] < 64))[is_label].all()
  assert (b["label"][~is_label] == -1).all()
  assert (b["skipped"] == 0).all()
  texts = [tokenizer.decode(t) for t in b["text"]]
  assert all(texts)
  names = pipeline.label_texts(c)
  for t, l, lab in zip(texts, b["label"], is_label):
    if lab:
      assert names[l] in t


def test_same_seed_same_batches_other_seed_differs(data_dir, tokenizer):
  a = take(data_config(data_dir), tokenizer, 2)
  b = take(data_config(data_dir), tokenizer, 2)
  c = take(data_config(data_dir, seed=1), tokenizer, 2)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_global_batch_independent_of_process_count(data_dir, tokenizer):
  c = data_config(data_dir)
  ref = take(c, tokenizer, 2)
  for n in (2, 4):
    parts = [take(c, tokenizer, 2, process_index=p, process_count=n) for p in range(n)]
    for s in range(2):
      for k in ref[s]:
        np.testing.assert_array_equal(np.concatenate([parts[p][s][k] for p in range(n)]),
                                      ref[s][k])


def test_start_step_resumes(data_dir, tokenizer):
  c = data_config(data_dir)
  fresh = take(c, tokenizer, 4)
  (resumed,) = take(c, tokenizer, 1, start_step=3)
  for k in resumed:
    np.testing.assert_array_equal(resumed[k], fresh[3][k])


def test_epochs_reshuffle():
  # The property make_train_iterator relies on: shuffle().repeat() reorders each epoch.
  import grain
  ds = grain.MapDataset.range(50).shuffle(seed=3).repeat()
  e0, e1 = [ds[i] for i in range(50)], [ds[i] for i in range(50, 100)]
  assert sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1


def test_mix_fractions(data_dir, tokenizer):
  c = data_config(data_dir, **{"data.sources.labels.weight": 0.75,
                               "data.sources.captions.weight": 0.25})
  batches = take(c, tokenizer, 5)
  src = np.concatenate([b["source"] for b in batches])
  assert abs((src == 1).mean() - 0.75) < 0.05


def test_a_source_with_weight_zero_is_off(data_dir, tokenizer):
  c = data_config(data_dir, **{"data.sources.labels.weight": 0.0})
  (b,) = take(c, tokenizer, 1)
  assert (b["source"] == 0).all() and (b["text_type"] == 0).all() and (b["label"] == -1).all()


@pytest.fixture
def bad_folder(tmp_path):
  write_bad_folder("bad_folder", str(tmp_path / "data"))
  return str(tmp_path / "data")


def test_bad_records_substituted_and_counted(bad_folder, tokenizer):
  src = tfds.data_source("bad_folder", split="train", data_dir=bad_folder)
  assert len(src) == 12
  c = data_config(bad_folder, batch_size=12)
  c.data.tokenizer.path = ""
  c.data.sources = {"folder": schema.source(
      "bad_folder", kind="label", label_key="label", weight=1.0)}
  # One global batch of 12 = one epoch (a permutation of the 12 records): exactly the two
  # bad ones are substituted, by their successors in storage order.
  (b,) = take(c, tokenizer, 1)
  assert b["image"].shape[0] == 12 and int((b["skipped"] > 0).sum()) == 2


# --- held-out classes (zero-shot transfer) ---------------------------------------------------


def test_held_out_classes_never_reach_a_training_batch(data_dir, tokenizer):
  """One whole epoch of the label source (a shuffle is a permutation): every label id and
  every label prompt is of a seen class; the tokenizer's label prompts too. Captions do
  show and name held-out combinations (the transfer the zero-shot evaluation measures)."""
  c = data_config(data_dir, batch_size=200, **{"data.sources.captions.weight": 0.0})
  assert c.data.sources.labels.name == "shapes/labels_seen"
  assert pipeline.label_texts(c) == list(shapes.SEEN_CLASS_NAMES)
  batches = take(c, tokenizer, 20)  # 20 x 200 = the 4000 training records
  labels = np.concatenate([b["label"] for b in batches])
  src = tfds.data_source("shapes/labels_seen", split="train", data_dir=data_dir)
  assert sorted(labels) == sorted(int(src[i]["label"]) for i in range(len(src)))
  prompts = [tokenizer.decode(t) for b in batches for t in b["text"]]
  unseen = shapes.UNSEEN_CLASS_NAMES
  for label, prompt in zip(labels, prompts):
    assert shapes.SEEN_CLASS_NAMES[label] in prompt
    assert not any(name in prompt for name in unseen), prompt
  texts = pipeline.train_texts(data_config(data_dir))
  templates = c.data.label_templates
  assert all(t.format(n) in texts for n in shapes.SEEN_CLASS_NAMES for t in templates)
  assert not any(t.format(n) in texts for n in unseen for t in templates)
  assert all(any(n in text for text in texts) for n in unseen)  # in captions only


# --- FLAVA: modality views and the unimodal phase (configs/flava.py) ----------------------
def test_unimodal_phase_batches_hold_only_unimodal_sources(data_dir):
  """loss.unimodal_steps=2: steps 0 and 1 are image-only and text-only examples, steps 2
  on the whole mixture; a resume at step 1 or 3 reads the uninterrupted run's batches."""
  config = helpers.flava_config(data_dir=data_dir, batch_size=32, **{"loss.unimodal_steps": 2})
  tokenizer = tk.get_tokenizer(config)
  fresh = take(config, tokenizer, 4)
  for b in fresh[:2]:
    assert not b["paired"].any()
    image_only = (b["has_image"] == 1) & (b["has_text"] == 0)
    assert image_only.any() and (~image_only).any()  # both unimodal sources
  for b in fresh[2:]:
    assert b["paired"].any() and not b["paired"].all()
  for start, resumed in ((1, take(config, tokenizer, 2, start_step=1)),
                         (3, take(config, tokenizer, 1, start_step=3))):
    for offset, batch in enumerate(resumed):
      for key in batch:
        np.testing.assert_array_equal(batch[key], fresh[start + offset][key])


def test_a_unimodal_phase_without_unimodal_sources_is_one_line(data_dir):
  config = helpers.flava_config(data_dir=data_dir, **{"data.sources.images.weight": 0.0,
                                                     "data.sources.texts.weight": 0.0})
  with pytest.raises(cli.ConfigError, match=r"loss.unimodal_steps=50: the unimodal phase "
                     "needs a source with modality 'image' or 'text'"):
    cli.validate(config, num_devices=1)
  with pytest.raises(errors.UsageError, match=r"a unimodal phase of 50 steps needs a source "
                     "with modality 'image' or 'text'"):
    pipeline.global_train_dataset(config, tk.get_tokenizer(config),
                                  unimodal_steps=objectives.unimodal_steps(config))


def test_pipeline_emits_modality_views(data_dir):
  config = helpers.flava_config(data_dir=data_dir, batch_size=64, **{"loss.unimodal_steps": 0})
  (batch,) = take(config, tk.get_tokenizer(config), 1)
  keys = sorted(config.data.sources.keys())  # source id = sorted key index
  modality = np.array([config.data.sources[k].modality for k in keys])[batch["source"]]
  np.testing.assert_array_equal(batch["paired"], modality == "paired")
  np.testing.assert_array_equal(batch["has_image"], modality != "text")
  np.testing.assert_array_equal(batch["has_text"], modality != "image")
  assert (batch["text"][modality == "image"] == 0).all()
  assert (batch["image"][modality == "text"] == 0).all()
  assert (batch["text"][modality != "image", 0] == vocabulary.BOS_ID).all()
  assert np.abs(batch["image"][modality != "text"]).sum() > 0
  assert set(modality) == {"paired", "image", "text"}
