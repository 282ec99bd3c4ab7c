"""Shapes build, TF-free reading, Grain pipeline determinism/topology, mocks, bad records,
FLAVA's modality views and unimodal phase."""
import io
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import helpers
from configs import schema
from conftest import REPO
from helpers import data_config, take, write_bad_folder
from mmjax import errors, vocabulary
from mmjax.data import tokenizer as tk
from mmjax.data import pipeline, shapes, sources


@pytest.fixture(scope="session")
def tokenizer(data_dir):
  return tk.get_tokenizer(data_config(data_dir))


def test_shapes_read_through_data_source(data_dir):
  labels = tfds.data_source("shapes/labels", split="validation", data_dir=data_dir)
  caps = tfds.data_source("shapes/captions", split="train", data_dir=data_dir)
  assert len(labels) == 500 and len(caps) == 4000
  ex = labels[3]
  assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
  assert 0 <= ex["label"] < 64
  assert labels.dataset_info.features["label"].names[0] == "red circle"
  for i in range(20):
    c = caps[i]["captions"]
    assert len(c) == 3 and all(x.strip() for x in c)
  assert "tensorflow" not in sys.modules


def test_a_first_build_says_what_it_did_in_one_line(tmp_path, capfd):
  """No TFDS "Downloading and preparing dataset Unknown size" or "Variant folder ... has no
  dataset_info.json" on a fresh data_dir: nothing is downloaded."""
  tfds.disable_progress_bar()
  shapes.ensure_built("shapes/labels_unseen", str(tmp_path))
  shapes.ensure_built("shapes/labels_unseen", str(tmp_path))  # built: silent
  out, err = capfd.readouterr()
  assert out.splitlines() == [line for line in out.splitlines() if line.startswith(
      f"Built shapes/labels_unseen (1000 generated images, nothing downloaded) into {tmp_path}")]
  assert len(out.splitlines()) == 1 and err == "", (out, err)
  assert len(tfds.data_source("shapes/labels_unseen", split="validation",
                              data_dir=str(tmp_path))) == 1000


def test_shapes_deterministic():
  a = shapes.caption_example(np.random.default_rng((1, 2, 3)))
  b = shapes.caption_example(np.random.default_rng((1, 2, 3)))
  assert a == b


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


def test_preview_json_reports_mix_fractions_close_to_weights(tmp_path, data_dir):
  import json
  out = helpers.call(
      [sys.executable, "-m", "mmjax.data.preview", "--config", f"{REPO}/configs/shapes.py",
       "--out", str(tmp_path / "batch.png"), "--num_batches", "8", "--json",
       f"--config.data_dir={data_dir}", "--config.data.sources.labels.weight=0.3",
       "--config.data.sources.captions.weight=0.7"], timeout=300, check=True)
  stats = json.loads(out.stdout.strip().splitlines()[-1])
  assert stats["weights_per_source"] == {"labels": 0.3, "captions": 0.7}
  for name, weight in stats["weights_per_source"].items():
    assert abs(stats["fraction_per_source"][name] - weight) <= 0.05
  assert (tmp_path / "batch.png").exists()


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


# --- held-out classes (zero-shot transfer) ---------------------------------------------------
def _digest(config_name, split, n=25):
  """sha256 of the first n examples' pixels and labels/captions, as the builder makes them."""
  import hashlib
  cfg = next(c for c in shapes.Shapes.BUILDER_CONFIGS if c.name == config_name)
  h = hashlib.sha256()
  for i in range(n):
    rng = np.random.default_rng((shapes._SEED, cfg.index, shapes._SPLITS[split], i))
    if config_name.startswith("labels"):
      png, label = shapes.label_example(rng, cfg.class_names)
      extra = str(label)
    else:
      png, captions = shapes.caption_example(rng)
      extra = "|".join(captions)
    h.update(np.asarray(Image.open(io.BytesIO(png))).tobytes())
    h.update(extra.encode())
  return h.hexdigest()[:16]


def test_shapes_data_is_pinned_per_version():
  """The examples of every config at its version. Adding labels_seen / labels_unseen left
  labels and captions bit-identical (cached 1.0.0 builds keep their meaning); a change of
  any config's data must come with a new version (and a new line here)."""
  assert str(shapes.Shapes.VERSION) == "1.0.0"
  assert {(name, split): _digest(name, split) for name, split in [
      ("labels", "train"), ("labels", "validation"), ("captions", "train"),
      ("captions", "validation"), ("labels_seen", "train"), ("labels_seen", "validation"),
      ("labels_unseen", "validation")]} == {
      ("labels", "train"): "011ddd32d942cfa5", ("labels", "validation"): "aa236c7dd9f80846",
      ("captions", "train"): "6ca19f71bf9c8d18", ("captions", "validation"): "9fab8cd430ab0e0d",
      ("labels_seen", "train"): "da73f30530789f62",
      ("labels_seen", "validation"): "b72b3da211ef648d",
      ("labels_unseen", "validation"): "193f4a6089218bc6"}


def test_held_out_classes_are_a_latin_square_of_the_colour_shape_grid():
  unseen, seen = shapes.UNSEEN_CLASS_NAMES, shapes.SEEN_CLASS_NAMES
  assert len(unseen) == 16 and len(seen) == 48 and not set(unseen) & set(seen)
  assert sorted(unseen + seen) == sorted(shapes.CLASS_NAMES)
  held_colour = [n.split()[0] for n in unseen]
  held_shape = [n.split()[1] for n in unseen]
  # Each colour and each shape held out exactly twice; each still in 6 seen classes.
  assert all(held_colour.count(c) == 2 for c in shapes.COLOURS)
  assert all(held_shape.count(s) == 2 for s in shapes.SHAPES)
  assert all(sum(n.startswith(c + " ") for n in seen) == 6 for c in shapes.COLOURS)
  assert all(sum(n.endswith(" " + s) for n in seen) == 6 for s in shapes.SHAPES)
  assert unseen[:4] == ("red circle", "red star", "orange square", "orange diamond")


def test_seen_and_unseen_datasets_hold_only_their_classes(data_dir):
  for name, names, splits in (("shapes/labels_seen", shapes.SEEN_CLASS_NAMES,
                               {"train": 4000, "validation": 500}),
                              ("shapes/labels_unseen", shapes.UNSEEN_CLASS_NAMES,
                               {"validation": 1000})):
    for split, size in splits.items():
      src = tfds.data_source(name, split=split, data_dir=data_dir)
      assert src.dataset_info.features["label"].names == list(names)
      labels = [int(src[i]["label"]) for i in range(len(src))]
      assert len(labels) == size and sorted(set(labels)) == list(range(len(names)))


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
  with pytest.raises(errors.UsageError, match=r"loss.unimodal_steps=50: the unimodal phase "
                     "needs a source with modality 'image' or 'text'"):
    pipeline.global_train_dataset(config, tk.get_tokenizer(config))


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
