"""mmjax.evaluate helpers that need no model (the evaluators run in test_train / test_flava)."""
import helpers
from mmjax import evaluate


def test_format_table_keeps_small_values_readable():
  table = evaluate.format_table({"probe/top1": 0.236, "probe/lambda": 1e-5, "r1": 0.0})
  assert table.splitlines() == ["probe/lambda  1e-05", "probe/top1    0.2360",
                                "r1            0.0000"]


def test_an_evaluator_with_zero_examples_is_off(monkeypatch):
  def fake(name):
    return lambda config, tokenizer: name
  monkeypatch.setattr(evaluate, "EVALUATORS", {n: fake(n) for n in evaluate.EVALUATORS})
  config = helpers.tiny_config()
  assert evaluate.build_evaluators(config, None) == ["zeroshot", "retrieval", "captioning",
                                                     "linear_probe"]
  config = helpers.tiny_config(**{"evals.captioning.num_examples": 0,
                                  "evals.linear_probe.num_examples": 0})
  assert evaluate.build_evaluators(config, None) == ["zeroshot", "retrieval"]
