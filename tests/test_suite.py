"""Benchmark suites (mmjax.evaluators.suite): the dataset table against TFDS's builders and
CLIP_benchmark's published names, each suite end to end on data shaped like the real
builders, and a suite member on the shapes job against mmjax.evaluate's own evaluators."""
import io
import json

import jax

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import helpers
from mmjax import errors, evaluate, evaluators, runtime, train
from mmjax.data import classnames
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evaluators import suite, suite_datasets
from mmjax.evaluators.suite_datasets import CLASSIFICATION, RETRIEVAL, BenchmarkDataset


def test_list_names_every_dataset_with_its_classes_and_templates():
  config = helpers.tiny_config(data_dir="/nonexistent")
  text = suite.list_datasets(config)
  assert text.splitlines()[-1] == "27 datasets; data_dir /nonexistent"
  assert "imagenet-r" in text and "train[21600:]" in text
  members = suite_datasets.every_dataset()
  assert len(members) >= 25
  for ds in members:
    if ds.task != CLASSIFICATION:
      continue
    templates = classnames.label_templates(config, ds.templates, "t")
    assert templates and all("{}" in t for t in templates)
    label = tfds.builder(ds.tfds).info.features[ds.label_key]  # the real builder's classes
    names = classnames.resolve_class_names(label.names, ds.class_names, key="k",
                                           dataset=ds.tfds, refuse_wordnet_ids=False)
    kept = classnames.class_subset(label.names, ds.class_subset, key="s")
    assert len(names) == label.num_classes and len(kept) == ds.num_classes, ds.name


def test_class_names_and_templates_are_clip_benchmarks():
  config = helpers.tiny_config()
  table = classnames.clip_benchmark_table("class_names")
  assert table["imagenet1k"] == list(classnames.builtin_class_names("imagenet1k").values())
  assert classnames.label_templates(config, "clip_benchmark/imagenet1k") == \
      classnames.label_templates(config, "openai_imagenet_80")
  assert classnames.label_templates(config, "clip_benchmark/food101") == (
      "a photo of {}, a type of food.",)
  assert classnames.as_words("/a/apartment_building/outdoor") == "apartment building outdoor"
  wnids = tfds.builder("imagenet_r").info.features["label"].names
  kept = classnames.class_subset(wnids, "imagenet_r", key="k")
  assert len(kept) == 200 and kept == sorted(kept)
  with pytest.raises(errors.ConfigError, match="CLIP_benchmark has no class names"):
    classnames.resolve_class_names(["a"], "clip_benchmark/nope", key="k", dataset="d",
                                   refuse_wordnet_ids=False)


def test_classification_metrics_match_an_independent_count():
  labels = np.array([0, 0, 0, 1, 2, 2])
  top5 = np.array([[0, 1], [1, 0], [0, 2], [1, 0], [0, 2], [1, 2]])
  got = evaluators.zeroshot.classification_metrics(top5, labels)
  # per class recall: 2/3, 1/1, 0/2 -> mean 5/9
  assert got == {"top1": 3 / 6, "top5": 1.0, "mean_per_class_recall": (2 / 3 + 1 + 0) / 3}


def _shapes_members():
  return (BenchmarkDataset("shapes_unseen", CLASSIFICATION, "shapes/labels_unseen",
                           "validation[:64]", 16),
          BenchmarkDataset("shapes_captions", RETRIEVAL, "shapes/captions", "validation[:64]",
                           text_key="captions"))


def _as_config_metrics(records):
  """CLIP_benchmark's metric names -> the config evaluators' (`zeroshot/<dataset>/top1`)."""
  out = {}
  for r in records:
    ds = next(d for d in _shapes_members() if d.name == r["dataset"])
    prefix = f"{suite.EVALUATOR_TYPES[ds.task]}/{ds.tfds.replace('/', '_')}"
    names = {v: k for k, v in suite.CLIP_BENCHMARK_METRICS[ds.task].items()}
    out.update({f"{prefix}/{names[k]}": v for k, v in r["metrics"].items()})
  return out


@pytest.fixture(scope="module")
def tiny_model(data_dir):
  """The tiny shapes config (zero-shot and retrieval on 64 images, in batches of 24: a
  padded last batch), its randomly initialised params on one device and an embedder."""
  config = helpers.tiny_config(**{
      "data_dir": data_dir, "total_steps": 2, "eval_every_steps": 0,
      "checkpoint_every_steps": 2, "eval_batch_size": 24,
      "evals.captioning.num_examples": 0, "evals.linear_probe.num_examples": 0,
      "evals.seen_classes.num_examples": 0})
  rt = runtime.build(config, jax.devices()[:1])
  with rt.activate():
    params = rt.init_state().params
  embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, config.eval_batch_size)
  return config, rt, params, embedder, tokenizer_lib.get_tokenizer(config)


def test_shapes_members_match_the_config_evaluators(tiny_model, tmp_path, monkeypatch,
                                                    capsys):
  """The suite's figures for shapes members equal the config's own evaluators exactly,
  the streamed zero-shot equals all images embedded at once, the files are CLIP_benchmark's
  format and a rerun resumes from them."""
  config, rt, params, embedder, tokenizer = tiny_model
  monkeypatch.setitem(suite_datasets.SUITES, "shapes", _shapes_members())
  workdir = str(tmp_path / "run")
  with rt.activate():
    expected = evaluators.run_evaluators(evaluators.build_evaluators(config, tokenizer),
                                         embedder, params)
    records = suite.run_suite(config, workdir, 7, "shapes", embedder, params, tokenizer)
    assert _as_config_metrics(records) == expected
    zeroshot = suite.build_member(config, _shapes_members()[0], tokenizer)
    scores = embedder.images(params, zeroshot.images) @ zeroshot.class_embeddings(
        embedder, params).T
  labels = zeroshot.split.rows(range(64))["labels"]
  assert float((scores.argmax(1) == labels).mean()) == records[0]["metrics"]["acc1"]

  out = tmp_path / "run" / "suite" / "step_7"
  record = json.loads((out / "shapes_unseen.json").read_text())
  assert {k: record[k] for k in ("dataset", "task", "language", "step")} == {
      "dataset": "shapes_unseen", "task": CLASSIFICATION, "language": "en", "step": 7}
  csv_rows = (out / "shapes.csv").read_text().splitlines()
  assert csv_rows[0].startswith("dataset,task,acc1,acc5,mean_per_class_recall,")
  assert csv_rows[-1].startswith("mean (2 datasets),,")
  assert (out / "shapes.md").read_text().startswith("| dataset | task |")
  assert helpers.metrics(workdir)[-1]["suite/shapes_unseen/acc1"] == record["metrics"]["acc1"]
  capsys.readouterr()
  with rt.activate():
    assert suite.run_suite(config, workdir, 7, "shapes", embedder, params, tokenizer) == records
  assert capsys.readouterr().out.count("done earlier") == 2


@pytest.mark.slow
def test_shapes_suite_matches_mmjax_evaluate_on_a_checkpoint(tiny_model, tmp_path,
                                                             monkeypatch):
  """Through the commands: a trained checkpoint, `mmjax.evaluate` and `--suite`."""
  config = tiny_model[0]
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  _, expected = evaluate.evaluate_checkpoint(config, workdir)
  monkeypatch.setitem(suite_datasets.SUITES, "shapes", _shapes_members())
  assert _as_config_metrics(evaluate.evaluate_suite(config, workdir, "shapes")) == expected


class _MockSource:
  """Records shaped like a real builder's (tfds.testing.mock_data's role, with images
  encoded as mmjax reads them): a PNG of random size and an int for every ClassLabel,
  ImageNet-A/-R labels drawn from the 200 classes those datasets hold."""

  def __init__(self, builder, num_examples):
    self.info, self.n = builder.info, num_examples
    subset = builder.name if builder.name in classnames.BUILTIN_SUBSETS else ""
    self.labels = {k: classnames.class_subset(f.names, subset, key="") for k, f in
                   self.info.features.items() if isinstance(f, tfds.features.ClassLabel)}

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    h, w = rng.integers(16, 48, size=2)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, format="PNG")
    return {"image": buf.getvalue(), **{k: int(rng.choice(v)) for k, v in self.labels.items()}}

  @property
  def dataset_info(self):
    return self.info


# Members with few prompts: a VTAB slice, names as words, CLIP_benchmark's names, a label
# feature other than `label`. Every member (ImageNet's 80k prompts each): the slow variant.
FEW = ("vtab/eurosat", "food101", "vtab/pets", "vtab/smallnorb_label_azimuth")


@pytest.mark.parametrize("which", [pytest.param("few"), pytest.param("all", marks=pytest.mark.slow)])
def test_classification_suites_run_end_to_end_on_mock_data(which, tiny_model, tmp_path,
                                                           monkeypatch):
  """Classification members of `clip_benchmark` (the `imagenet` suite's among them) on 5
  mock images each, with their real builders' classes and CLIP_benchmark's names and
  templates."""
  config, rt, params, embedder, tokenizer = tiny_model
  if which == "all":  # ImageNet's 80k prompts per member
    embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, 2048)
  members = [d for d in suite_datasets.SUITES["clip_benchmark"] if d.task == CLASSIFICATION
             and (which == "all" or d.name in FEW)]
  monkeypatch.setitem(suite_datasets.SUITES, "clip_benchmark", tuple(members))
  monkeypatch.setattr(suite, "is_present", lambda ds, data_dir: True)
  workdir = str(tmp_path / "run")

  def data_source(builder, split, decoders=None, **kwargs):
    return _MockSource(builder, 5)
  with tfds.testing.mock_data(num_examples=5, as_data_source_fn=data_source), rt.activate():
    records = suite.run_suite(config, workdir, 0, "clip_benchmark", embedder, params,
                              tokenizer)
    assert [r["dataset"] for r in records] == [d.name for d in members]
    for r in records:
      assert set(r["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
      assert all(0 <= v <= 1 for v in r["metrics"].values())
    other = "imagenet" if which == "all" else "clip_benchmark"
    resumed = suite.run_suite(config, workdir, 0, other, embedder, params, tokenizer)
  # members done (as another suite's) are not evaluated again
  assert resumed == [r for r in records if r["dataset"] in
                     {d.name for d in suite_datasets.SUITES[other]}]


def test_a_missing_dataset_is_one_line_or_stops_the_suite_with_strict(tmp_path):
  config = helpers.tiny_config(data_dir=str(tmp_path))
  missing = suite_datasets.IMAGENET[0]
  line = f"{missing.tfds} is not in {tmp_path}; download ILSVRC2012_img_val.tar"
  out = suite.run_suite(config, str(tmp_path / "w"), 0, "imagenet", None, None, None)
  assert out == [] and not (tmp_path / "w").exists()
  with pytest.raises(errors.UsageError, match=line):
    suite.run_suite(config, str(tmp_path / "w"), 0, "imagenet", None, None, None,
                    strict=True)
  with pytest.raises(errors.UsageError, match="choose one of imagenet, clip_benchmark"):
    suite.suite_members("imagenet21k")
