"""Benchmark suites (mmjax.evaluators.suite): the dataset table against TFDS's builders and
CLIP_benchmark's published names, each suite end to end on data shaped like the real
builders, and a suite member on the shapes job against mmjax.evaluate's own evaluators."""
import builtins
import copy
import dataclasses
import io
import os
import pickle
import socket
import subprocess
import sys
import json

import jax

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import helpers
from conftest import REPO
from mmjax import errors, evaluate, evaluators, runtime, train, vocabulary
from mmjax.data import classnames, pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evaluators import captioning, suite, suite_datasets
from mmjax.evaluators.suite_datasets import CLASSIFICATION, RETRIEVAL, BenchmarkDataset


def test_suite_list_needs_no_workdir_and_evaluation_does():
  listed = helpers.run_cli("mmjax.evaluate", "--suite=list", "--config.data_dir=/nonexistent")
  assert listed.returncode == 0 and "27 datasets; data_dir /nonexistent" in listed.stdout, (
      listed.stderr[-2000:])
  line = helpers.usage_error(helpers.run_cli("mmjax.evaluate", "--suite=imagenet"),
                             "mmjax.evaluate")
  assert "--workdir" in line


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


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
          "immunohistochemistry", "coins", "colorwheel", "logo", "moon", "page", "text",
          "clock", "grass", "gravel", "brick", "retina")


class CocoCaptionsLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """coco_captions' features (image, image/filename, image/id, captions: Sequence of
  {id, text}) over scikit-image's photos, two distinct captions each: the real builder
  needs TensorFlow even under tfds.testing.mock_data."""
  VERSION = tfds.core.Version("1.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(), "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    skimage_data = pytest.importorskip("skimage.data")
    for i, name in enumerate(PHOTOS):
      pixels = getattr(skimage_data, name)()
      buf = io.BytesIO()
      Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG")
      short = name.split("_")[0][:8]
      yield i, {"image": buf.getvalue(), "image/filename": f"{name}.jpg", "image/id": i,
                "captions": [{"id": 2 * i, "text": short},
                             {"id": 2 * i + 1, "text": f"the {short}"}]}


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
  """(data_dir, the retrieval and captioning members pointed at CocoCaptionsLike)."""
  data_dir = str(tmp_path_factory.mktemp("coco_like"))
  CocoCaptionsLike(data_dir=data_dir).download_and_prepare(file_format="array_record")
  return data_dir, tuple(dataclasses.replace(d, tfds="coco_captions_like")
                         for d in (suite_datasets.COCO_RETRIEVAL,
                                   suite_datasets.COCO_CAPTIONING))


@pytest.mark.parametrize("java", [pytest.param(False),
                                  pytest.param(True, marks=pytest.mark.slow)])
def test_retrieval_and_captioning_suites_run_end_to_end(java, tiny_model, coco_like, tmp_path,
                                                        monkeypatch):
  """With Java (slow: the JVM loads METEOR's paraphrase tables) captioning adds METEOR."""
  if java and not captioning.java_scorers():
    pytest.skip("no java on PATH")
  if not java:
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  config, rt, params, embedder, tokenizer = tiny_model
  data_dir, (retrieve, caption) = coco_like
  config = helpers.override(copy.deepcopy(config), data_dir=data_dir)
  monkeypatch.setitem(suite_datasets.SUITES, "retrieval", (retrieve,))
  monkeypatch.setitem(suite_datasets.SUITES, "captioning", (caption,))
  with rt.activate():
    (retrieved,) = suite.run_suite(config, str(tmp_path), 0, "retrieval", embedder, params,
                                   tokenizer)
    (captioned,) = suite.run_suite(config, str(tmp_path), 0, "captioning", embedder, params,
                                   tokenizer)
  assert set(retrieved["metrics"]) == set(
      suite.CLIP_BENCHMARK_METRICS[suite_datasets.RETRIEVAL].values())
  assert set(captioned["metrics"]) - {"SPICE"} == (
      {"CIDEr", "Bleu_4", "METEOR"} if java else {"CIDEr", "Bleu_4"})
  assert all(0 <= v < 10 for v in captioned["metrics"].values())
  assert retrieved["task"] == "zeroshot_retrieval" and captioned["task"] == "captioning"
  # both are "mscoco_captions": the task keeps their files apart
  assert sorted(os.listdir(tmp_path / "suite" / "step_0")) == [
      "captioning.csv", "captioning.md", "mscoco_captions.json",
      "mscoco_captions_captioning.json", "retrieval.csv", "retrieval.md"]


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


@pytest.mark.parametrize("which", ["few", pytest.param("all", marks=pytest.mark.slow)])
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
    for r, ds in zip(records, members):  # no acc5 below 5 classes (pcam), as CLIP_benchmark
      assert set(r["metrics"]) == {"acc1", "mean_per_class_recall"} | (
          {"acc5"} if ds.num_classes >= 5 else set())
      assert all(0 <= v <= 1 for v in r["metrics"].values())
    other = "imagenet" if which == "all" else "clip_benchmark"
    resumed = suite.run_suite(config, workdir, 0, other, embedder, params, tokenizer)
  # members done (as another suite's) are not evaluated again
  assert resumed == [r for r in records if r["dataset"] in
                     {d.name for d in suite_datasets.SUITES[other]}]


def test_a_missing_dataset_is_one_line_or_stops_the_suite_with_strict(tmp_path, capsys):
  config = helpers.tiny_config(data_dir=str(tmp_path))
  missing = suite_datasets.IMAGENET[0]
  line = f"{missing.tfds} is not in {tmp_path}; download ILSVRC2012_img_val.tar"
  out = suite.run_suite(config, str(tmp_path / "w"), 0, "imagenet", None, None, None)
  assert out == [] and not (tmp_path / "w").exists()
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith(f"skipped imagenet1k: {line}")
  assert printed[-1] == "suite imagenet: 0 of 5 datasets done"
  with pytest.raises(errors.UsageError, match=line):
    suite.run_suite(config, str(tmp_path / "w"), 0, "imagenet", None, None, None,
                    strict=True)
  with pytest.raises(errors.UsageError, match="choose one of imagenet, clip_benchmark"):
    suite.suite_members("imagenet21k")


class _Loader(list):
  """Batches, and the `dataset.classes` CLIP_benchmark reads off a DataLoader."""

  def __init__(self, batches, classes):
    super().__init__(batches)
    self.dataset = type("Dataset", (), {"classes": classes})


class _OpenClipLike:
  """What CLIP_benchmark's zero-shot and retrieval code calls on a model (`encode_image`,
  `encode_text`, torch tensors in and out) and on a tokenizer, around an mmjax model."""

  def __init__(self, torch, embedder, params, tokenizer, max_len):
    self.torch, self.embedder, self.params = torch, embedder, params
    self.tokenizer, self.max_len = tokenizer, max_len

  def tokenize(self, texts):
    return self.torch.from_numpy(self.tokenizer.encode(list(texts), self.max_len))

  def encode_image(self, images):  # uint8 pixels [B, S, S, 3], as mmjax's evaluators read
    return self.torch.from_numpy(self.embedder.images(self.params, images.numpy()))

  def encode_text(self, tokens):
    text_type = np.full(len(tokens), vocabulary.CAPTION, np.int32)
    return self.torch.from_numpy(self.embedder.texts(self.params, tokens.numpy(), text_type))


def test_clip_benchmark_gives_the_same_figures(tiny_model, coco_like, monkeypatch):
  """CLIP_benchmark's own zero-shot classification and retrieval code, fed the same images
  and texts through a wrapper around the same model, against the suite's figures."""
  torch = pytest.importorskip("torch")
  cb_zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
  cb_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
  # clip-benchmark 1.6.2's `accuracy` calls float() on a 1-element array, which NumPy 2.4
  # refuses; a module-level float that accepts it leaves its code as it is.
  monkeypatch.setattr(cb_zeroshot, "float", lambda x: builtins.float(np.asarray(x).item()),
                      raising=False)
  config, rt, params, embedder, tokenizer = tiny_model
  # retrieval on photos with distinct captions: shapes repeats some captions, and tied
  # scores may rank either way
  classify, (retrieve, _) = _shapes_members()[0], coco_like[1]
  photos = helpers.override(copy.deepcopy(config), data_dir=coco_like[0])
  with rt.activate():
    ours = {"classify": suite.run_member(suite.build_member(config, classify, tokenizer),
                                         classify, embedder, params),
            "retrieve": suite.run_member(suite.build_member(photos, retrieve, tokenizer),
                                         retrieve, embedder, params)}
    model = _OpenClipLike(torch, embedder, params, tokenizer, config.data.max_text_len)
    zeroshot = suite.build_member(config, classify, tokenizer)
    rows = zeroshot.split.rows(range(len(zeroshot.split)))
    images = torch.from_numpy(rows["images"])
    loader = _Loader([(images[i:i + 10], torch.from_numpy(rows["labels"][i:i + 10]))
                      for i in range(0, len(images), 10)], zeroshot.class_names)
    theirs = cb_zeroshot.evaluate(model, loader, model.tokenize, zeroshot.class_names,
                                  [t.replace("{}", "{c}") for t in zeroshot.templates],
                                  device="cpu", amp=False)
    assert theirs == ours["classify"]

    rows = pipeline.load_eval_split(suite.member_config(photos, retrieve), "retrieval",
                                    num_examples=suite.ALL)
    images = torch.from_numpy(rows["images"])
    loader = [(images[i:i + 10], rows["texts"][i:i + 10]) for i in range(0, len(images), 10)]
    theirs = cb_retrieval.evaluate(model, loader, model.tokenize, device="cpu", amp=False,
                                   recall_k_list=[1, 5, 10])
  assert theirs == pytest.approx(ours["retrieve"], rel=1e-6)  # theirs: float32 means
  assert 0 < ours["retrieve"]["text_retrieval_recall@10"] < 1


def test_zero_shot_streams_each_row_once_over_several_devices(tiny_model):
  """On 4 devices each batch of 24 is read as the devices' 4 spans of 6 rows, every row of
  the split once (the last batch padded with the last row), with 1 device's figures."""
  config, rt1, params1, embedder1, tokenizer = tiny_model
  member = _shapes_members()[0]
  with rt1.activate():
    one = suite.run_member(suite.build_member(config, member, tokenizer), member, embedder1,
                           params1)
  rt = runtime.build(config, jax.devices()[:4])
  with rt.activate():
    params = jax.device_put(jax.device_get(params1), rt.shardings.params)
    embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, 24)
    zeroshot = suite.build_member(config, member, tokenizer)
    reads, rows = [], zeroshot.split.rows
    zeroshot.split.rows = lambda indices: reads.append(list(indices)) or rows(indices)
    four = suite.run_member(zeroshot, member, embedder, params)
  assert four == one
  assert [len(r) for r in reads] == [6] * 12
  assert sorted(i for r in reads for i in r) == list(range(64)) + [63] * 8


_TWO_PROCESS_PROGRAM = """
import json, pickle, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
sys.path.insert(0, "tests")
import helpers
from mmjax import evaluators, runtime
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evaluators import suite
from mmjax.evaluators.suite_datasets import BenchmarkDataset, CLASSIFICATION
config = helpers.tiny_config(data_dir=sys.argv[3])
member = BenchmarkDataset("shapes_unseen", CLASSIFICATION, "shapes/labels_unseen",
                          "validation[:64]", 16)
rt = runtime.build(config, params_only=True)
abstract = rt.abstract_state
with open(sys.argv[4], "rb") as f:
  values = jax.tree.unflatten(jax.tree.structure(abstract), pickle.load(f))
params = jax.tree.map(lambda a, x: jax.make_array_from_callback(
    a.shape, a.sharding, lambda index: x[index]), abstract, values)
tokenizer = tokenizer_lib.get_tokenizer(config)
with rt.activate():
  embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, 24)
  zeroshot = suite.build_member(config, member, tokenizer)
  reads, rows = [], zeroshot.split.rows
  zeroshot.split.rows = lambda index: reads.append([int(i) for i in index]) or rows(index)
  metrics = suite.run_member(zeroshot, member, embedder, params)
print(json.dumps({"metrics": metrics, "reads": reads}))
"""


@pytest.mark.slow
def test_two_processes_each_decode_only_their_rows(tiny_model, tmp_path):
  """2 processes x 2 devices: each process decodes the rows its devices hold (disjoint,
  together the whole split) and both get the figures of one process with 4 devices."""
  config, _, params1, _, tokenizer = tiny_model
  member = _shapes_members()[0]
  with open(tmp_path / "params.pkl", "wb") as f:
    pickle.dump(jax.tree.leaves(jax.device_get(params1)), f)
  rt = runtime.build(config, jax.devices()[:4])
  with rt.activate():
    params = jax.device_put(jax.device_get(params1), rt.shardings.params)
    embedder = evaluators.Embedder(rt.model, rt.mesh, config.mesh.rules, 24)
    expected = suite.run_member(suite.build_member(config, member, tokenizer), member,
                                embedder, params)
  port = socket.socket()
  port.bind(("127.0.0.1", 0))
  address = f"127.0.0.1:{port.getsockname()[1]}"
  port.close()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS_PROGRAM, address, str(i), config.data_dir,
       str(tmp_path / "params.pkl")], cwd=REPO, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, env={**helpers.environment(2),
                                   "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"})
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [e[-3000:] for _, e in outs]
  results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  assert results[0]["metrics"] == results[1]["metrics"] == expected
  rows = [sorted(i for r in res["reads"] for i in r) for res in results]
  assert not set(rows[0]) & set(rows[1]) - {63}
  assert sorted(rows[0] + rows[1]) == list(range(64)) + [63] * 8
