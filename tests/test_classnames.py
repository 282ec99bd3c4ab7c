"""Class names and prompt templates: the built-in data, the one lookup, the WordNet-id guard,
and ImageNet prompts end to end (TFDS mock data, TF-free)."""
import re

import pytest
import tensorflow_datasets as tfds

import helpers
from configs import coca, flava, schema, shapes
from mmjax.data import classnames, pipeline, sources
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.errors import ConfigError
from mmjax.evaluators import ZeroShot

WNID = re.compile(r"\bn\d{8}\b")


def test_imagenet_names_follow_tfds_label_order():
  """The built-in ids are TFDS imagenet2012's ClassLabel names, in order (sorted WordNet ids),
  and known classes sit at their indices."""
  table = classnames.builtin_class_names("imagenet1k")
  tfds_ids = tfds.builder("imagenet2012").info.features["label"].names
  assert list(table) == list(tfds_ids) == sorted(tfds_ids) and len(table) == 1000
  names = list(table.values())
  anchors = {0: ("n01440764", "tench"), 1: ("n01443537", "goldfish"),
             2: ("n01484850", "great white shark"), 207: ("n02099601", "Golden Retriever"),
             281: ("n02123045", "tabby cat"), 409: ("n02708093", "analog clock"),
             954: ("n07753592", "banana"), 999: ("n15075141", "toilet paper")}
  for index, (wnid, name) in anchors.items():
    assert (list(table)[index], names[index]) == (wnid, name)
  assert not any(classnames.WORDNET_ID.fullmatch(n) for n in names)


def test_builtin_template_sets():
  config = shapes.get_config()
  helpers.override(config, **{"data.label_template_set": "openai_imagenet_80"})
  clip = classnames.label_templates(config)
  assert len(clip) == 80 and clip[0] == "a bad photo of a {}." and "itap of a {}." in clip
  simple = classnames.label_templates(config, "simple")
  assert len(simple) == 7 and set(simple) <= set(clip)
  # "" keeps data.label_templates; zero-shot's "" means the training set.
  assert classnames.label_templates(shapes.get_config()) == shapes.get_config(
  ).data.label_templates


def test_template_file_and_bad_templates(tmp_path):
  config = shapes.get_config()
  path = tmp_path / "templates.txt"
  path.write_text("a {} here.\nthere is a {}.\n")
  assert classnames.label_templates(config, str(path)) == ("a {} here.", "there is a {}.")
  path.write_text("no slot here.\n")
  with pytest.raises(ConfigError, match="evals.zeroshot.templates.*exactly one"):
    classnames.label_templates(config, str(path), "evals.zeroshot.templates")
  with pytest.raises(ConfigError, match="evals.zeroshot.templates='nope'"):
    classnames.label_templates(config, "nope", "evals.zeroshot.templates")


def test_resolve_by_wordnet_id_in_any_order():
  """Automatic and named lookups match by WordNet id, so an ImageNet variant whose labels are
  ordered differently (TFDS imagenet_resized) still gets the right names."""
  ids = tfds.builder("imagenet_resized/8x8").info.features["label"].names
  assert ids[:2] == ["n02119789", "n02100735"]  # not imagenet2012's order
  table = classnames.builtin_class_names("imagenet1k")
  for spec in ("", "imagenet1k"):
    names = classnames.resolve_class_names(ids, spec, key="k", dataset="d",
                                           refuse_wordnet_ids=True)
    assert names[:2] == ["kit fox", "English Setter"]
    assert names == [table[i] for i in ids]


def test_resolve_other_specs(tmp_path):
  kw = dict(key="data.sources.x.class_names", dataset="d", refuse_wordnet_ids=True)
  assert classnames.resolve_class_names(["cat", "dog"], "", **kw) == ["cat", "dog"]
  path = tmp_path / "names.txt"
  path.write_text("house cat\nhound\n")
  assert classnames.resolve_class_names(["0", "1"], str(path), **kw) == ["house cat", "hound"]
  with pytest.raises(ConfigError, match=r"data.sources.x.class_names=.*2 names for the 3"):
    classnames.resolve_class_names(["0", "1", "2"], str(path), **kw)
  path.write_text("house cat\n\nhound\n")
  with pytest.raises(ConfigError, match="line 2 is blank"):
    classnames.resolve_class_names(["0", "1", "2"], str(path), **kw)
  with pytest.raises(ConfigError, match="no such class-name file"):
    classnames.resolve_class_names(["0"], str(tmp_path / "missing.txt"), **kw)
  with pytest.raises(ConfigError, match="'imagenet1k'.*not WordNet ids"):
    classnames.resolve_class_names(["cat"], "imagenet1k", **kw)


def test_wordnet_ids_refused_unless_allowed():
  ids = ["n01440764", "n01443537"]
  with pytest.raises(ConfigError, match=r"WordNet ids \('n01440764'.*set config "
                                        r"data.sources.x.class_names.*allow_wordnet_ids"):
    classnames.resolve_class_names(ids, "dataset", key="data.sources.x.class_names",
                                   dataset="d", refuse_wordnet_ids=True)
  assert classnames.resolve_class_names(ids, "dataset", key="k", dataset="d",
                                        refuse_wordnet_ids=False) == ids


def _mock_imagenet_config(data_dir, **overrides):
  """configs/shapes.py:clip,tiny training on imagenet2012 only, zero-shot on its validation."""
  config = shapes.get_config("clip,tiny")
  config.unlock()
  config.data.sources = {"imagenet": schema.source(
      "imagenet2012", kind="label", label_key="label", weight=1.0)}
  config.lock()
  return helpers.override(config, **{
      "data_dir": data_dir, "batch_size": 8, "data.tokenizer.vocab_size": 512,
      "evals.zeroshot.dataset": "imagenet2012", "evals.zeroshot.num_examples": 4,
      **overrides})


@pytest.fixture(scope="module")
def mock_imagenet(tmp_path_factory):
  """TFDS imagenet2012 mock data (the real ClassLabel: WordNet ids) and a tokenizer trained
  on the prompts the pipeline builds from it."""
  config = _mock_imagenet_config(str(tmp_path_factory.mktemp("data")))
  with helpers.mock_tfds(num_examples=8):
    yield config, tokenizer_lib.get_tokenizer(config)


def test_imagenet_training_prompts_use_names(mock_imagenet):
  config, tokenizer = mock_imagenet
  train = sources.open_train_sources(config)
  assert train.class_names[:2] == ["tench", "goldfish"]
  texts = sources.train_texts(config)  # what the tokenizer learns
  assert "a photo of a tench." in texts and not any(WNID.search(t) for t in texts)
  source = train.sources[0]
  for i in range(len(source)):  # every record's text is its class's name
    record = source[i]
    assert record["texts"] == [train.class_names[record["label"]]]
  it = pipeline.make_train_iterator(config, tokenizer, start_step=0, process_index=0,
                                    process_count=1)
  try:
    batch = next(it)
  finally:
    it.close()
  decoded = [tokenizer.decode(t) for t in batch["text"]]
  assert not any(WNID.search(t) for t in decoded)
  # Each text is its class's prompt, cut at data.max_text_len tokens: a prefix of it.
  templates = classnames.label_templates(config)
  assert all(any(tmpl.format(train.class_names[label]).startswith(t) for tmpl in templates)
             for t, label in zip(decoded, batch["label"]))


def test_imagenet_zero_shot_prompts_use_names(mock_imagenet):
  config, tokenizer = mock_imagenet
  helpers.override(config, **{"evals.zeroshot.templates": "simple"})
  zeroshot = ZeroShot("zeroshot", config, tokenizer)
  assert zeroshot.prompts[:2] == ["itap of a tench.", "a bad photo of the tench."]
  assert len(zeroshot.prompts) == 7000 and not any(WNID.search(p) for p in zeroshot.prompts)


def test_imagenet_wordnet_ids_refused_naming_the_key(mock_imagenet):
  config, tokenizer = mock_imagenet
  bad = helpers.override(_mock_imagenet_config(config.data_dir), **{
      "data.sources.imagenet.class_names": "dataset", "evals.zeroshot.class_names": "dataset"})
  with pytest.raises(ConfigError, match="set config data.sources.imagenet.class_names"):
    sources.open_train_sources(bad)
  with pytest.raises(ConfigError, match="set config evals.zeroshot.class_names"):
    ZeroShot("zeroshot", bad, tokenizer)
  helpers.override(bad, **{"data.allow_wordnet_ids": True})  # asked for: allowed
  assert sources.open_train_sources(bad).class_names[0] == "n01440764"
  assert ZeroShot("zeroshot", bad, tokenizer).prompts[0] == "a photo of a n01440764."


@pytest.mark.parametrize("name,arg", [("coca", "base"), ("coca", "tiny"), ("flava", "full")])
def test_paper_configs_never_see_wordnet_ids(mock_imagenet, name, arg):
  """configs/coca.py and configs/flava.py:full open their ImageNet sources and zero-shot /
  linear-probe splits as training and evaluation do: clean names, CLIP's templates."""
  data_dir = mock_imagenet[0].data_dir
  config = helpers.override({"coca": coca, "flava": flava}[name].get_config(arg),
                            data_dir=data_dir)
  for key, s in config.data.sources.items():
    if s.name == "imagenet2012":
      assert sources.open_configured_source(config, key).class_names[0] == "tench"
  for evaluator in ("zeroshot", "linear_probe"):
    split = pipeline.load_eval_split(config, evaluator, num_examples=2, for_prompts=True)
    assert split["class_names"][:2] == ["tench", "goldfish"]
  templates = classnames.label_templates(config, config.evals.zeroshot.templates)
  assert len(templates) == 80
  prompts = [t.format(n) for n in split["class_names"] for t in templates]
  assert not any(WNID.search(p) for p in prompts)
