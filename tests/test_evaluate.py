"""mmjax.evaluate helpers that need no model (the evaluators run in test_train / test_flava)."""
from mmjax import evaluate


def test_format_table_keeps_small_values_readable():
  table = evaluate.format_table({"probe/top1": 0.236, "probe/lambda": 1e-5, "r1": 0.0})
  assert table.splitlines() == ["probe/lambda  1e-05", "probe/top1    0.2360",
                                "r1            0.0000"]
