"""Benchmark suites: mmjax's evaluators run over a named list of datasets
(`mmjax.evaluators.suite_datasets`), results written the way CLIP_benchmark writes them.

  python -m mmjax.evaluate --config C --workdir W --suite imagenet|clip_benchmark|retrieval|
      captioning|list [--step N] [--strict]

Each member becomes one `evals.<type>` entry of a copy of the config (the evaluator the
config would build for it: `ZeroShot`, `Retrieval`, `Captioning`), so a suite figure and a
config evaluator's figure on the same data are the same computation. Per member, under
`<workdir>/suite/step_<N>/`: `<dataset>.json` in CLIP_benchmark's result format (dataset,
model, pretrained, task, metrics, language), written as soon as the member finishes; a rerun
skips the members whose file exists (an interrupted suite resumes). At the end, a summary
`<suite>.md` / `<suite>.csv` (one row per member, the suite's mean last) and TensorBoard
scalars `suite/<dataset>/<metric>` at step N. Captioning adds METEOR (and SPICE where its
Stanford CoreNLP jars are installed) to CIDEr-D and BLEU-4 when `java` is on PATH. A member
whose files are not in data_dir is skipped with one line saying how to obtain them, or
stops the suite with `--strict`.
"""
import copy
import csv
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from configs import schema
from mmjax import errors, writers
from mmjax.data import classnames
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluators import captioning
from mmjax.evaluators.base import Evaluator
from mmjax.evaluators.captioning import Captioning
from mmjax.evaluators.embedder import Embedder
from mmjax.evaluators.retrieval import Retrieval
from mmjax.evaluators.suite_datasets import (CAPTIONING, CLASSIFICATION, RETRIEVAL, SUITES,
                                             BenchmarkDataset, every_dataset, how_to_obtain,
                                             is_present)
from mmjax.evaluators.zeroshot import ZeroShot

# mmjax metric -> CLIP_benchmark's name for it, per task (its zeroshot_classification,
# zeroshot_retrieval and captioning metrics). Image retrieval = text -> image.
CLIP_BENCHMARK_METRICS = {
    CLASSIFICATION: {"top1": "acc1", "top5": "acc5",
                     "mean_per_class_recall": "mean_per_class_recall"},
    RETRIEVAL: {f"{d}_r{k}": f"{'image' if d == 't2i' else 'text'}_retrieval_recall@{k}"
                for d in ("t2i", "i2t") for k in (1, 5, 10)},
    CAPTIONING: {"cider": "CIDEr", "bleu4": "Bleu_4", "meteor": "METEOR", "spice": "SPICE"},
}
EVALUATOR_TYPES = {CLASSIFICATION: "zeroshot", RETRIEVAL: "retrieval",
                   CAPTIONING: "captioning"}
ALL = sys.maxsize  # num_examples: the whole split


def member_config(config: ml_collections.ConfigDict, ds: BenchmarkDataset
                  ) -> ml_collections.ConfigDict:
  """A copy of `config` whose only evaluator is the one for `ds` (key = its type)."""
  if ds.task == CLASSIFICATION:
    entry = schema.zeroshot_eval(ds.tfds, ds.split, num_examples=ALL)
    entry.update(label_key=ds.label_key, class_names=ds.class_names, templates=ds.templates,
                 class_subset=ds.class_subset)
  elif ds.task == RETRIEVAL:
    entry = schema.retrieval_eval(ds.tfds, ds.split, num_examples=ALL)
    entry.text_key = ds.text_key
  else:  # the config's own decoding settings when it has a captioning evaluator
    own = config.evals.get("captioning")
    entry = (copy.deepcopy(own) if own is not None and own.type == "captioning"
             else schema.captioning_eval())
    with entry.unlocked():
      entry.update(dataset=ds.tfds, split=ds.split, text_key=ds.text_key, num_examples=ALL,
                   num_samples=0, max_new_tokens=int(config.data.max_text_len) - 1)
  out = copy.deepcopy(config)
  with out.unlocked():
    out.evals = ml_collections.ConfigDict({EVALUATOR_TYPES[ds.task]: entry})
  return out


def build_member(config: ml_collections.ConfigDict, ds: BenchmarkDataset,
                 tokenizer: Tokenizer) -> Evaluator:
  cls = {CLASSIFICATION: ZeroShot, RETRIEVAL: Retrieval, CAPTIONING: Captioning}[ds.task]
  return cls(EVALUATOR_TYPES[ds.task], member_config(config, ds), tokenizer)


def run_member(evaluator: Evaluator, ds: BenchmarkDataset, embedder: Embedder,
               params: Any) -> dict[str, float]:
  """The evaluator's metrics under CLIP_benchmark's names."""
  if isinstance(evaluator, ZeroShot):  # the one that streams large splits
    results = evaluator(embedder, params, progress=ds.name)
  else:
    results = evaluator(embedder, params)
  if isinstance(evaluator, Captioning):  # METEOR, SPICE where Java is present
    scores = captioning.java_scores(evaluator.last_captions, evaluator.references)
    results.update({f"{evaluator.name}/{k}": v for k, v in scores.items()})
  names = CLIP_BENCHMARK_METRICS[ds.task]
  out = {names[k.rsplit("/", 1)[1]]: v for k, v in results.items()}
  if ds.task == CLASSIFICATION and len(evaluator.class_names) < 5:
    del out["acc5"]  # every image is right in its top 5: CLIP_benchmark reports none
  return out


def result_dir(workdir: str, step: int) -> epath.Path:
  return epath.Path(workdir) / "suite" / f"step_{step}"


def run_suite(config: ml_collections.ConfigDict, workdir: str, step: int, suite: str,
              embedder: Embedder, params: Any, tokenizer: Tokenizer, *,
              strict: bool = False) -> list[dict[str, Any]]:
  """Runs every member of `suite` not yet done at `step` (see module docstring); returns
  the result records (CLIP_benchmark format) of every member done, in suite order."""
  members = suite_members(suite)
  out_dir = result_dir(workdir, step)
  writing = jax.process_index() == 0
  records = []
  for ds in members:
    path = out_dir / f"{ds.file_stem}.json"
    if path.exists():
      print(f"{ds.name}: done earlier ({path})", flush=True)
      records.append(json.loads(path.read_text()))
      continue
    if not is_present(ds, config.data_dir):
      line = (f"{ds.name}: {ds.tfds} is not in {config.data_dir}; "
              f"{how_to_obtain(ds, config.data_dir)}")
      if strict:
        raise errors.UsageError(line + " (or drop --strict to skip it)")
      print(f"skipped {line}", flush=True)
      continue
    evaluator = build_member(config, ds, tokenizer)
    metrics = run_member(evaluator, ds, embedder, params)
    record = {"dataset": ds.name, "model": config.name or "mmjax", "pretrained": workdir,
              "step": step, "task": ds.task, "metrics": metrics, "language": "en"}
    if writing:
      out_dir.mkdir(parents=True, exist_ok=True)
      tmp = out_dir / f"{ds.file_stem}.json.tmp"
      tmp.write_text(json.dumps(record, indent=1))
      tmp.rename(path)  # a killed run leaves no half-written result
    print(f"{ds.name}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    records.append(record)
  print(f"suite {suite}: {len(records)} of {len(members)} datasets done", flush=True)
  if writing and records:
    write_summary(out_dir, suite, records)
    writer = writers.MetricWriter(workdir)
    writer.write(step, {f"suite/{r['dataset']}/{k}": v for r in records
                        for k, v in r["metrics"].items()})
    writer.close()
  return records


def suite_members(suite: str) -> Sequence[BenchmarkDataset]:
  if suite not in SUITES:
    raise errors.UsageError(f"--suite={suite!r}: choose one of {', '.join(SUITES)} or list")
  return SUITES[suite]


def summary_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """(header, rows): one row per record, every metric a column (blank where a task has no
  such metric), then the suite's mean of each column over the records that have it."""
  metrics = list(dict.fromkeys(k for r in records for k in r["metrics"]))
  header = ["dataset", "task"] + metrics
  rows = [[r["dataset"], r["task"]] + [_cell(r["metrics"].get(m)) for m in metrics]
          for r in records]
  means = []
  for m in metrics:
    values = [r["metrics"][m] for r in records if m in r["metrics"]]
    means.append(_cell(sum(values) / len(values)))
  rows.append([f"mean ({len(records)} datasets)", ""] + means)
  return header, rows


def _cell(value: float | None) -> str:
  return "" if value is None else f"{value:.4f}"


def write_summary(out_dir: epath.Path, suite: str, records: list[dict[str, Any]]) -> None:
  header, rows = summary_rows(records)
  text = io.StringIO()
  csv.writer(text, lineterminator="\n").writerows([header] + rows)
  (out_dir / f"{suite}.csv").write_text(text.getvalue())
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  (out_dir / f"{suite}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def list_datasets(config: ml_collections.ConfigDict) -> str:
  """`--suite list`: every dataset with its suites, TFDS name, split, classes, templates and
  whether data_dir holds it."""
  header = ("dataset", "task", "suites", "tfds", "split", "classes", "templates", "present")
  rows = []
  for ds in every_dataset():
    suites = ",".join(s for s, members in SUITES.items() if ds in members)
    templates = (len(classnames.label_templates(config, ds.templates, "suite"))
                 if ds.templates else "")
    rows.append((ds.name, ds.task, suites, ds.tfds, ds.split, ds.num_classes or "",
                 templates, "yes" if is_present(ds, config.data_dir) else "no"))
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
           for row in (header, *rows)]
  return "\n".join(lines + [f"{len(rows)} datasets; data_dir {config.data_dir}"])
