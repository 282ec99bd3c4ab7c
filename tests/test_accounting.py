"""Skipped-record counts (per step, summed over the global batch) and the evidence-based guard."""
import io
import math

import numpy as np
import pytest
from PIL import Image

from configs import schema
from mmjax.data import accounting, sources
from helpers import data_config, take, write_bad_folder

KEYS, NAMES = ["captions", "labels"], ["my_pairs", "my_pets"]


def account(max_fraction=0.1, confidence=0.9999, restored=None):
  return accounting.SkipAccount(KEYS, NAMES, max_fraction=max_fraction, confidence=confidence,
                                restored=restored)


def counts(examples=(0, 0), bad=(0, 0), skipped=(0, 0)):
  return np.array([examples, bad, skipped], np.int32)


def test_batch_counts_per_source():
  rng = np.random.default_rng(0)
  source = rng.integers(0, 3, 64).astype(np.int32)
  skipped = np.where(rng.random(64) < 0.3, rng.integers(1, 5, 64), 0).astype(np.int32)
  got = np.asarray(accounting.batch_counts({"source": source, "skipped": skipped}, 3))
  for s in range(3):
    mine = source == s
    assert got[:, s].tolist() == [mine.sum(), (skipped[mine] > 0).sum(), skipped[mine].sum()]


@pytest.mark.parametrize("bad, total", [(1, 2), (2, 18), (10, 20), (50, 1000), (999, 1000)])
def test_wilson_lower_bound_solves_the_score_test(bad, total):
  """The bound is the p < p_hat where the one-sided score statistic equals z: checked by
  bisection on that equation, independently of the closed form."""
  z = 3.090232306167813  # one-sided 99.9%
  p_hat = bad / total
  score = lambda p: (p_hat - p) / math.sqrt(p * (1 - p) / total) - z
  lo, hi = 1e-12, p_hat
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if score(mid) > 0 else (lo, mid)
  assert accounting.wilson_lower_bound(bad, total, 0.999) == pytest.approx(lo, abs=1e-9)


def test_the_issue_case_does_not_stop():
  """3% bad records against a 10% limit: 18 reads of which 2 bad, then a long run."""
  acc = account()
  acc.add(counts(examples=(18, 0), bad=(2, 0), skipped=(2, 0)))
  rng = np.random.default_rng(1)
  for _ in range(5000):
    bad = int((rng.random(8) < 0.03).sum())
    acc.add(counts(examples=(8, 8), bad=(bad, 0), skipped=(bad, 0)))
  assert acc.skipped > 1000


def test_half_bad_stops_soon_naming_source_counts_and_key():
  acc = account()
  with pytest.raises(accounting.TooManySkippedError) as error:
    for _ in range(20):
      acc.add(counts(examples=(8, 8), bad=(0, 4), skipped=(0, 7)))
  message = str(error.value)
  assert acc.counts[accounting.EXAMPLES, 1] <= 48  # within six steps of 8 examples
  assert "'labels' (my_pets)" in message and "data.max_skip_fraction=0.1" in message
  examples, skipped = acc.counts[0, 1], acc.counts[2, 1]
  assert f"{examples // 2} of {examples} examples" in message
  assert f"{skipped} records skipped" in message and "\n" not in message


def test_all_bad_stops_at_once():
  acc = account()
  with pytest.raises(accounting.TooManySkippedError):
    acc.add(counts(examples=(0, 4), bad=(0, 4), skipped=(0, 400)))


def test_a_run_of_bad_records_is_one_bad_draw():
  """5% of a source's records are bad, all in one run of 50 (a broken shard). A draw into
  the run costs up to 50 reads, so skipped / reads jumps far above 10% early on; the guard
  judges draws, which stay near 5%: no stop over several epochs."""
  good = io.BytesIO()
  Image.new("RGB", (4, 4), (200, 10, 10)).save(good, format="PNG")
  records = [{"image": b"" if 400 <= i < 450 else good.getvalue(), "label": 0}
             for i in range(1000)]
  opened = sources.OpenedSource("broken_shard", "train", records, ["red"])
  src = sources.CleanSource(opened, key="labels", source_index=1, kind="label",
                            image_key="image", label_key="label")
  acc, rng = account(), np.random.default_rng(0)
  naive_fired = False
  order = np.concatenate([rng.permutation(1000) for _ in range(3)])
  for start in range(0, len(order), 8):
    skipped = np.array([src[int(i)]["skipped"] for i in order[start:start + 8]], np.int32)
    acc.add(np.asarray(accounting.batch_counts(
        {"source": np.ones_like(skipped), "skipped": skipped}, 2)))
    reads = acc.counts[0, 1] + acc.counts[2, 1]
    naive_fired |= bool(reads >= 20 and acc.counts[2, 1] > 0.1 * reads)
  assert naive_fired  # a reads-based rule would have stopped this healthy source
  assert acc.counts[1, 1] / acc.counts[0, 1] == pytest.approx(0.05, abs=0.015)


def test_state_restores_exactly_and_new_sources_start_at_zero():
  acc = account()
  acc.add(counts(examples=(10, 6), bad=(1, 0), skipped=(3, 0)))
  restored = {"step": 7, **acc.state()}
  again = account(restored=restored)
  np.testing.assert_array_equal(again.counts, acc.counts)
  assert again.metrics() == acc.metrics() == {
      "data/skipped": 3, "data/skipped/captions": 3, "data/skipped/labels": 0,
      "data/read/captions": 13, "data/read/labels": 6}
  other = accounting.SkipAccount(["captions", "extra"], ["a", "b"], max_fraction=0.1,
                                 confidence=0.9999, restored=restored)
  assert other.counts[:, 1].tolist() == [0, 0, 0] and other.counts[2, 0] == 3


def test_real_pipeline_with_two_bad_records_in_twelve(tmp_path):
  """2 of 12 records are undecodable (1/6 of the draws). The pipeline's batches fed to the
  account: a 50% limit never stops; a 5% limit stops once the evidence is in."""
  from mmjax.data import tokenizer as tk
  data_dir = str(tmp_path / "data")
  write_bad_folder("bad_folder", data_dir)
  config = data_config(data_dir, batch_size=12)
  config.data.sources = {"folder": schema.source(
      "bad_folder", kind="label", label_key="label", weight=1.0)}
  batches = take(config, tk.get_tokenizer(config), 12)
  lenient = accounting.SkipAccount(["folder"], ["bad_folder"], max_fraction=0.5,
                                   confidence=0.9999)
  strict = accounting.SkipAccount(["folder"], ["bad_folder"], max_fraction=0.05,
                                  confidence=0.9999)
  stopped_at = None
  for step, batch in enumerate(batches, start=1):
    step_counts = np.asarray(accounting.batch_counts(batch, 1))
    lenient.add(step_counts)
    if stopped_at is None:
      try:
        strict.add(step_counts)
      except accounting.TooManySkippedError:
        stopped_at = step
  assert lenient.counts[:, 0].tolist() == [144, 24, 24]  # 12 epochs: 2 bad draws each
  assert stopped_at is not None and stopped_at > 1
