"""mmjax.evaluators.grid.evaluate_and_record, the one evaluation path of train and evaluate
(the sample grid itself: tests/test_train.py's samples_10.png, tests/test_writers.py on gs://)."""
import contextlib
import os

from mmjax import writers
from mmjax.evaluators import grid


class FakeEmbedder:
  def __init__(self):
    self.reported = []

  @contextlib.contextmanager
  def reporting(self, name):
    self.reported.append(name)
    yield


class FakeEvaluator:
  def __init__(self, name, calls):
    self.name, self.calls = name, calls

  def __call__(self, embedder, params):
    self.calls.append((self.name, params))
    return {f"{self.name}/top1": 0.5}


def test_runs_only_the_due_evaluators_and_records_no_grid_without_captioning(tmp_path):
  calls, embedder = [], FakeEmbedder()
  due = [FakeEvaluator("a", calls)]
  everything = [*due, FakeEvaluator("b", calls)]
  writer = writers.MetricWriter(str(tmp_path))
  results = grid.evaluate_and_record(due, everything, embedder, "params", writer,
                                     str(tmp_path), 7)
  writer.close()
  assert results == {"a/top1": 0.5}
  assert calls == [("a", "params")] and embedder.reported == ["a"]
  assert not os.path.exists(tmp_path / "eval")  # no captioning evaluator: no picture
