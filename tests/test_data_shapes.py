"""mmjax.data.shapes: the synthetic shapes datasets, built once, pinned per version, read
TF-free; their held-out classes."""
import io
import sys

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import shapes


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
