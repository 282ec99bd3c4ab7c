"""mmjax.evaluators.grid.evaluate_and_record, the one evaluation path of train and evaluate
(the sample grid itself: tests/test_train.py's samples_10.png, tests/test_writers.py on gs://)."""
import os

from mmjax import writers
from mmjax.evaluators import grid


def test_runs_only_the_due_evaluators_and_records_no_grid_without_captioning(tmp_path):
  calls = []

  def evaluator(name):
    def run(embedder, params):
      calls.append((name, embedder, params))
      return {f"{name}/top1": 0.5}
    return run

  due, everything = [evaluator("a")], [evaluator("a"), evaluator("b")]
  writer = writers.MetricWriter(str(tmp_path))
  results = grid.evaluate_and_record(due, everything, "embedder", "params", writer,
                                     str(tmp_path), 7)
  writer.close()
  assert results == {"a/top1": 0.5}
  assert calls == [("a", "embedder", "params")]
  assert not os.path.exists(tmp_path / "eval")  # no captioning evaluator: no picture
