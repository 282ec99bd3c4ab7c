"""Transient store errors are retried with backoff and counted; a flaky gs:// (FakeGCS failing
30% of uploads) loses no metrics line and no goodput update."""
import json
import random

import numpy as np
import pytest
from etils import epath

from conftest import FakeGCS, FakeGCSError
from mmjax import goodput, retry, writers


def test_backoff_doubles_up_to_the_cap_and_permanent_errors_are_not_retried():
  waits = []
  retrier = retry.Retrier(attempts=5, delay_s=1, max_delay_s=3, sleep=waits.append)
  calls = iter([TimeoutError("slow"), FakeGCSError(503, "down"), ConnectionError("reset"),
                "ok"])

  def flaky():
    value = next(calls)
    if isinstance(value, Exception):
      raise value
    return value

  assert retrier.call(flaky, "upload") == "ok"
  assert waits == [1, 2, 3] and retrier.retries == 3
  with pytest.raises(PermissionError):
    retrier.call(lambda: (_ for _ in ()).throw(PermissionError("no")), "upload")
  with pytest.raises(FakeGCSError):
    retrier.call(lambda: (_ for _ in ()).throw(FakeGCSError(404, "gone")), "upload")
  assert retrier.retries == 3


def test_a_flaky_store_loses_no_metrics_and_no_goodput_update(gcs, capsys):
  FakeGCS.rng, FakeGCS.failure_rate = random.Random(0), 0.3
  storage = retry.Retrier(delay_s=0, attempts=8)
  writer = writers.MetricWriter("gs://bucket/run", retrier=storage)
  accounts = goodput.Goodput("gs://bucket/run", True, retrier=storage)
  for step in range(1, 41):
    writer.write(step, {"loss": np.float32(1.0 / step)})
    retries_before_last_write = storage.retries
    accounts.write()
  writer.close()  # its TensorBoard upload may be retried too: counted at a later write
  FakeGCS.failure_rate = 0.0
  lines = epath.Path("gs://bucket/run/metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))
  assert FakeGCS.failures > 10 and storage.retries == FakeGCS.failures
  saved = json.loads(epath.Path("gs://bucket/run/goodput.json").read_text())
  # The file holds every retry before its own write (that write's and close()'s come later).
  assert retries_before_last_write <= saved["storage_retries"] <= storage.retries
  assert "503 Service Unavailable" in capsys.readouterr().err


def test_a_store_down_for_longer_keeps_the_lines_for_the_next_upload(gcs):
  FakeGCS.rng, FakeGCS.failure_rate = random.Random(0), 1.0
  writer = writers.MetricWriter("gs://bucket/run", retrier=retry.Retrier(delay_s=0,
                                                                         attempts=3))
  writer.write(1, {"loss": 2.0})  # every try fails: a warning, no exception
  FakeGCS.failure_rate = 0.0
  writer.write(2, {"loss": 1.0})
  lines = epath.Path("gs://bucket/run/metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  writer.close()


def test_injected_store_failures_hit_only_their_window_of_steps():
  faults = retry.InjectedFailures.from_environment(
      {"MMJAX_DEBUG_STORE_FAILURES": "0.5:3-4"}, seed=0)
  assert retry.InjectedFailures.from_environment({}, seed=0) is None
  retrier = retry.Retrier(delay_s=0, attempts=50, faults=faults)
  for step in range(1, 7):
    retrier.at_step(step)
    before = retrier.retries
    for _ in range(20):
      assert retrier.call(lambda: "ok", "upload") == "ok"
    assert (retrier.retries > before) == (step in (3, 4)), step
  assert retrier.retries == faults.injected
  assert retry.is_transient(retry.InjectedStoreError("503"))
