"""Human-readable class names and prompt templates for label datasets.

One lookup serves every place a class name becomes text: training prompts and the
tokenizer's training texts (`mmjax.data.sources`, `mmjax.data.transforms`) and zero-shot
prompts (`mmjax.evaluators.zeroshot`).

Class names (`data.sources.<key>.class_names`, `evals.zeroshot.class_names`,
`evals.linear_probe.class_names`):
  ""          automatic: a dataset whose ClassLabel names are all ImageNet-1k WordNet ids
              (TFDS imagenet2012, and the ImageNet variants that label by WordNet id) gets
              the built-in `imagenet1k` names, matched by id; any other dataset keeps its own.
  "dataset"   the dataset's own ClassLabel names, as they are.
  "dataset_words"  the dataset's own names as words: "_" -> " ", a leading "/a/" path
              dropped (TFDS food101 "apple_pie" -> "apple pie", sun397 "/a/abbey" -> "abbey"),
              as CLIP_benchmark names food101 and sun397.
  a built-in  name of a set below, matched to the dataset's WordNet ids.
  "clip_benchmark/<dataset>"  CLIP_benchmark's published English names for <dataset>
              (`clip_benchmark_en_classnames.json`), in the dataset's label order.
  a path      a text file, one class name per line in the dataset's label order (local or
              gs://).
Prompts are refused when a class name looks like a WordNet id (`n01440764`): "a photo of a
n01440764." teaches a model nothing about language. `data.allow_wordnet_ids=True` permits it.

Templates (`data.label_template_set`, `evals.zeroshot.templates`): "" keeps
`data.label_templates` (zero-shot: the training templates); a built-in set name,
"clip_benchmark/<dataset>" (CLIP_benchmark's templates for it) or a file with one template
per line (`{}` where the name goes) replaces them.

Class subsets (`evals.zeroshot.class_subset`): "" keeps every class; a built-in subset
(`imagenet_a`, `imagenet_r`: the 200 ImageNet-1k classes each variant keeps, by WordNet id)
restricts the candidates to those classes.

Built-in sets live in `mmjax/data/label_text/` with their provenance (PROVENANCE.md).
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Sequence

import ml_collections
from etils import epath

from mmjax.errors import ConfigError

WORDNET_ID = re.compile(r"n\d{8}")
# name -> file of "<WordNet id>\t<name>" lines (CLIP's cleaned ImageNet names)
BUILTIN_CLASS_NAMES = {"imagenet1k": "imagenet1k.tsv"}
# name -> file of templates, one per line
BUILTIN_TEMPLATES = {"openai_imagenet_80": "templates_openai_imagenet_80.txt",
                     "simple": "templates_simple.txt"}
DATASET_NAMES = "dataset"
DATASET_WORDS = "dataset_words"
CLIP_BENCHMARK = "clip_benchmark/"  # + a CLIP_benchmark dataset name
CLIP_BENCHMARK_FILES = {"class_names": "clip_benchmark_en_classnames.json",
                        "templates": "clip_benchmark_en_templates.json"}
# name -> file of WordNet ids, one per line (a subset of imagenet1k's classes)
BUILTIN_SUBSETS = {"imagenet_a": "imagenet_a_wnids.txt", "imagenet_r": "imagenet_r_wnids.txt"}


def _package_file(name: str) -> str:
  return (importlib.resources.files("mmjax.data") / "label_text" / name).read_text("utf-8")


@functools.cache
def builtin_class_names(name: str) -> dict[str, str]:
  """Built-in set `name` as {WordNet id: class name}, in the file's (label) order."""
  rows = (line.split("\t") for line in _package_file(BUILTIN_CLASS_NAMES[name]).splitlines())
  return {wnid: label for wnid, label in rows}


@functools.cache
def clip_benchmark_table(kind: str) -> dict[str, list[str]]:
  """CLIP_benchmark's {dataset: class names} (kind "class_names") or {dataset: templates}
  (kind "templates", "{c}" rewritten to "{}")."""
  table = json.loads(_package_file(CLIP_BENCHMARK_FILES[kind]))
  if kind == "templates":
    table = {k: [t.replace("{c}", "{}") for t in v] for k, v in table.items()}
  return table


def _clip_benchmark(spec: str, kind: str, key: str) -> list[str]:
  table = clip_benchmark_table(kind)
  name = spec[len(CLIP_BENCHMARK):]
  if name not in table:
    raise ConfigError(f"config {key}={spec!r}: CLIP_benchmark has no {kind.replace('_', ' ')} "
                      f"for {name!r}; it has {', '.join(sorted(table))}")
  return list(table[name])


def as_words(name: str) -> str:
  """A dataset's label as words, as CLIP_benchmark names torchvision's food101 / sun397:
  "apple_pie" -> "apple pie", "/a/apartment_building/outdoor" -> "apartment building outdoor"."""
  name = re.sub(r"^/[a-z]/", "", name)
  return name.replace("_", " ").replace("/", " ")


def class_subset(dataset_names: Sequence[str], spec: str, *, key: str) -> list[int]:
  """Indices (ascending) of the dataset classes that subset `spec` keeps; all for ""."""
  if not spec:
    return list(range(len(dataset_names)))
  if spec not in BUILTIN_SUBSETS:
    raise ConfigError(f"config {key}={spec!r}: not a class subset; choose one of "
                      f"{sorted(BUILTIN_SUBSETS)} or '' for every class")
  kept = set(_package_file(BUILTIN_SUBSETS[spec]).split())
  indices = [i for i, n in enumerate(dataset_names) if n in kept]
  if len(indices) != len(kept):
    raise ConfigError(f"config {key}={spec!r}: the dataset's class names are not the WordNet "
                      f"ids of that subset ({len(indices)} of {len(kept)} found)")
  return indices


def _read_lines(path: str, key: str, what: str) -> list[str]:
  file = epath.Path(path).expanduser()
  if not file.exists():
    raise ConfigError(f"config {key}={path!r}: no such {what} file (or name one of the "
                      f"built-in sets)")
  lines = [line.strip() for line in file.read_text("utf-8").splitlines()]
  if not all(lines):
    raise ConfigError(f"config {key}={path!r}: line {lines.index('') + 1} is blank "
                      f"(one {what} per line)")
  return lines


def resolve_class_names(dataset_names: Sequence[str], spec: str, *, key: str, dataset: str,
                        refuse_wordnet_ids: bool) -> list[str]:
  """The class names prompts use for a dataset whose ClassLabel names are `dataset_names`.

  spec: the config value at `key` (see the module docstring). refuse_wordnet_ids: raise
  ConfigError, naming `key`, if a resolved name looks like a WordNet id (set by callers
  that build prompts, unless data.allow_wordnet_ids).
  """
  dataset_names = list(dataset_names)
  imagenet = builtin_class_names("imagenet1k")
  if not spec:
    names = ([imagenet[n] for n in dataset_names] if all(n in imagenet for n in dataset_names)
             else dataset_names)
  elif spec == DATASET_NAMES:
    names = dataset_names
  elif spec == DATASET_WORDS:
    names = [as_words(n) for n in dataset_names]
  elif spec.startswith(CLIP_BENCHMARK):
    names = _clip_benchmark(spec, "class_names", key)
    if len(names) != len(dataset_names):
      raise ConfigError(f"config {key}={spec!r}: {len(names)} names for the "
                        f"{len(dataset_names)} classes of {dataset!r}")
  elif spec in BUILTIN_CLASS_NAMES:
    table = builtin_class_names(spec)
    missing = [n for n in dataset_names if n not in table]
    if missing:
      raise ConfigError(f"config {key}={spec!r}: {len(missing)} class names of {dataset!r} "
                        f"are not WordNet ids of that set (e.g. {missing[0]!r}); point {key} "
                        "at a class-name file instead")
    names = [table[n] for n in dataset_names]
  else:
    names = _read_lines(spec, key, "class-name")
    if len(names) != len(dataset_names):
      raise ConfigError(f"config {key}={spec!r}: {len(names)} names for the "
                        f"{len(dataset_names)} classes of {dataset!r}")
  if refuse_wordnet_ids:
    ids = [n for n in names if WORDNET_ID.fullmatch(n.strip())]
    if ids:
      raise ConfigError(
          f"{dataset!r} class names look like WordNet ids ({ids[0]!r}, {len(ids)} in all), "
          f"which would make prompts like 'a photo of a {ids[0]}.': set config {key} to a "
          f"class-name file or one of {sorted(BUILTIN_CLASS_NAMES)}, or "
          "data.allow_wordnet_ids=True to use them")
  return names


def label_templates(config: ml_collections.ConfigDict, spec: str = "",
                    key: str = "data.label_template_set") -> tuple[str, ...]:
  """Prompt templates ("a photo of a {}."): `spec` (a built-in set name or a file; the
  config value at `key`) or, when empty, `data.label_template_set`, else
  `data.label_templates`."""
  if not spec:
    spec, key = config.data.label_template_set, "data.label_template_set"
  if not spec:
    templates, key = tuple(config.data.label_templates), "data.label_templates"
  elif spec in BUILTIN_TEMPLATES:
    templates = tuple(_package_file(BUILTIN_TEMPLATES[spec]).splitlines())
  elif spec.startswith(CLIP_BENCHMARK):
    templates = tuple(_clip_benchmark(spec, "templates", key))
  else:
    templates = tuple(_read_lines(spec, key, "template"))
  bad = [t for t in templates if t.count("{}") != 1 or set("{}") & set(t.replace("{}", ""))]
  if not templates or bad:
    raise ConfigError(f"config {key}: every template needs exactly one '{{}}' for the class "
                      f"name; got {bad[:1] or 'none'}")
  return templates
