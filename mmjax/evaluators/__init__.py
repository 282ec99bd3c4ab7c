"""Evaluators, chosen per `config.evals.<key>` entry by its `type` from `EVALUATORS`.

An evaluator is built once from its entry (loading its images and texts) and called with
(embedder, params) -> {metric name: value}; metric names start with the type's prefix
(`zeroshot/`, `retrieval/`, `caption/`, `linear_probe/`) or, when the entry's key is not
the type's name, with the key, so one config can run several evaluators of one type
(e.g. `evals.zeroshot` and `evals.seen_classes`; `mmjax.evaluators.base`). An entry with
num_examples=0 is off (locked configs cannot drop keys:
`--config.evals.captioning.num_examples=0`).

An evaluator class owns its entry's keys: `section` (its configs/schema.py `<type>_eval`)
and `check(key, config)` (`mmjax.cli.validate` runs every entry's). A new evaluator is its
module, one line in EVALUATORS and its section in configs/schema.py.
"""
from typing import Any

import ml_collections

from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluators.base import Evaluator
from mmjax.evaluators.captioning import Captioning
from mmjax.evaluators.embedder import Embedder
from mmjax.evaluators.linear_probe import LinearProbe
from mmjax.evaluators.retrieval import Retrieval
from mmjax.evaluators.zeroshot import ZeroShot


EVALUATORS = {"zeroshot": ZeroShot, "retrieval": Retrieval, "captioning": Captioning,
              "linear_probe": LinearProbe}


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of every `config.evals` entry, one line each: an unknown `type`, else the
  type's own `check` (the shared checks are `Evaluator.check`)."""
  problems = []
  for key, entry in config.evals.items():
    if entry.type in EVALUATORS:
      problems += EVALUATORS[entry.type].check(key, config)
    else:
      problems.append(f"config evals.{key}.type={entry.type!r}: choose one of "
                      f"{list(EVALUATORS)}")
  return problems


def build_evaluators(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list[Evaluator]:
  """One evaluator per enabled `config.evals` entry, in key order."""
  return [EVALUATORS[entry.type](key, config, tokenizer)
          for key, entry in config.evals.items() if entry.num_examples > 0]


def run_evaluators(evaluators: list[Evaluator], embedder: Embedder,
                   params: Any) -> dict[str, float]:
  results = {}
  for evaluator in evaluators:
    with embedder.reporting(evaluator.name):  # progress lines for work past 10 s
      results.update(evaluator(embedder, params))
  return results


def format_results(results: dict[str, float]) -> str:
  """One `name  value` line per metric; 4 decimals, or 4 significant digits for values
  below 1e-3 that are not zero (a probe's chosen lambda of 1e-5 must not read 0.0000)."""
  width = max((len(k) for k in results), default=0)

  def fmt(v: float) -> str:
    return f"{v:.4g}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"

  return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in sorted(results.items()))
