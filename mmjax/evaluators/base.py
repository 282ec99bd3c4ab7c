"""What every evaluator shares: its config entry and the names of its metrics."""
from typing import Any

import ml_collections


class Evaluator:
  """Built from `config.evals[key]`; called as evaluator(embedder, params) -> {metric: value}.

  Metric names are `<prefix>/<dataset>/<metric>`: the prefix is the type's METRIC_PREFIX
  when the entry's key is the type's name (`evals.zeroshot`), else the key itself
  (`evals.zeroshot_unseen`), so one config can run several evaluators of one type."""
  METRIC_PREFIX = ""

  def __init__(self, key: str, config: ml_collections.ConfigDict):
    self.key, self.entry = key, config.evals[key]
    prefix = self.METRIC_PREFIX if key == self.entry.type else key
    self.name = f"{prefix}/{self.entry.dataset.replace('/', '_')}"

  def __call__(self, embedder: Any, params: Any) -> dict[str, float]:
    raise NotImplementedError
