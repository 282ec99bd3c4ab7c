"""mmjax.evaluators plumbing that needs no model (the evaluators run in test_train /
test_flava, the probe's maths in test_linear_probe)."""
import helpers
from configs import schema
from mmjax import evaluators


def test_format_results_keeps_small_values_readable():
  table = evaluators.format_results({"probe/top1": 0.236, "probe/lambda": 1e-5, "r1": 0.0})
  assert table.splitlines() == ["probe/lambda  1e-05", "probe/top1    0.2360",
                                "r1            0.0000"]


class _Fake(evaluators.Evaluator):
  """The evaluators' base (config entry, metric names) without loading any data."""

  def __init__(self, key, config, tokenizer):
    del tokenizer
    super().__init__(key, config)
    self.built = (self.name.split("/")[0], self.entry.type, self.entry.dataset)


def _fakes(monkeypatch):
  fakes = {t: type(t, (_Fake,), {"METRIC_PREFIX": cls.METRIC_PREFIX})
           for t, cls in evaluators.EVALUATORS.items()}
  monkeypatch.setattr(evaluators, "EVALUATORS", fakes)


def test_an_evaluator_with_zero_examples_is_off(monkeypatch):
  _fakes(monkeypatch)
  config = helpers.tiny_config()
  built = [e.built[0] for e in evaluators.build_evaluators(config, None)]
  assert built == ["caption", "linear_probe", "retrieval", "zeroshot"]
  config = helpers.tiny_config(**{"evals.captioning.num_examples": 0,
                                  "evals.linear_probe.num_examples": 0})
  assert [e.built[0] for e in evaluators.build_evaluators(config, None)] == [
      "retrieval", "zeroshot"]


def test_several_evaluators_of_one_type_get_their_key_as_metric_prefix(monkeypatch):
  _fakes(monkeypatch)
  config = helpers.tiny_config()
  config.unlock()
  config.evals.zeroshot_captions = schema.zeroshot_eval("shapes/captions_as_labels")
  config.lock()
  built = {e.built for e in evaluators.build_evaluators(config, None)}
  assert ("zeroshot", "zeroshot", "shapes/labels") in built
  assert ("zeroshot_captions", "zeroshot", "shapes/captions_as_labels") in built
