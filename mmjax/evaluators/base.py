"""What every evaluator shares: its config entry, its checks and the names of its metrics."""
from typing import Any, Callable

import ml_collections


class Evaluator:
  """Built from `config.evals[key]`; called as evaluator(embedder, params) -> {metric: value}.

  Metric names are `<prefix>/<dataset>/<metric>`: the prefix is the type's METRIC_PREFIX
  when the entry's key is the type's name (`evals.zeroshot`), else the key itself
  (`evals.zeroshot_unseen`), so one config can run several evaluators of one type."""
  METRIC_PREFIX = ""
  section: Callable[..., ml_collections.ConfigDict]  # its entry, configs/schema.py `<type>_eval`
  choices: dict[str, tuple] = {}  # entry key -> its allowed values (checked by `check`)

  @classmethod
  def check(cls, key: str, config: ml_collections.ConfigDict) -> list[str]:
    """Problems of the entry `config.evals[key]`, one line each naming the key."""
    e, problems = config.evals[key], []
    if e.num_examples < 0:
      problems.append(f"config evals.{key}.num_examples={e.num_examples} must be >= 0 "
                      "(0 = off)")
    if e.every_steps < -1:
      problems.append(f"config evals.{key}.every_steps={e.every_steps} must be -1 (only at "
                      "the last step), 0 (at every eval_every_steps) or a positive step "
                      "interval")
    problems += [f"config evals.{key}.{field}={e[field]!r}: choose one of {list(allowed)}"
                 for field, allowed in cls.choices.items() if e[field] not in allowed]
    return problems

  def __init__(self, key: str, config: ml_collections.ConfigDict):
    self.key, self.entry = key, config.evals[key]
    prefix = self.METRIC_PREFIX if key == self.entry.type else key
    self.name = f"{prefix}/{self.entry.dataset.replace('/', '_')}"

  def __call__(self, embedder: Any, params: Any) -> dict[str, float]:
    raise NotImplementedError
