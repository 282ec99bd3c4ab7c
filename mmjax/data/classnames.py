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
  a built-in  name of a set below, matched to the dataset's WordNet ids.
  a path      a text file, one class name per line in the dataset's label order (local or
              gs://).
Prompts are refused when a class name looks like a WordNet id (`n01440764`): "a photo of a
n01440764." teaches a model nothing about language. `data.allow_wordnet_ids=True` permits it.

Templates (`data.label_template_set`, `evals.zeroshot.templates`): "" keeps
`data.label_templates` (zero-shot: the training templates); a built-in set name or a file
with one template per line (`{}` where the name goes) replaces them.

Built-in sets live in `mmjax/data/label_text/` with their provenance (PROVENANCE.md).
"""
from __future__ import annotations

import functools
import importlib.resources
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


def _package_file(name: str) -> str:
  return (importlib.resources.files("mmjax.data") / "label_text" / name).read_text("utf-8")


@functools.cache
def builtin_class_names(name: str) -> dict[str, str]:
  """Built-in set `name` as {WordNet id: class name}, in the file's (label) order."""
  rows = (line.split("\t") for line in _package_file(BUILTIN_CLASS_NAMES[name]).splitlines())
  return {wnid: label for wnid, label in rows}


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
  else:
    templates = tuple(_read_lines(spec, key, "template"))
  bad = [t for t in templates if t.count("{}") != 1 or set("{}") & set(t.replace("{}", ""))]
  if not templates or bad:
    raise ConfigError(f"config {key}: every template needs exactly one '{{}}' for the class "
                      f"name; got {bad[:1] or 'none'}")
  return templates
