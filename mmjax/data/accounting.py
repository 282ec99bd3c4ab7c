"""Exact, resumable counts of skipped records, and the guard that stops a run on bad data.

A source's record that cannot be used (undecodable image, no non-blank caption) is replaced
by the next one (mmjax.data.sources.CleanSource) and counted in the example's `skipped`.
Each train step reports, per active source (sorted keys), `batch_counts` of its global batch: it
sums over every host's slice inside the step, so the counts are the job's, not one
process's, and are a pure function of the step like the batch itself. `SkipAccount` adds
them up step by step; its totals at a checkpointed step are stored in the checkpoint's
`data` item and restored on resume, so `data/skipped` is exact after any number of
resumes and on any number of hosts.

The guard judges the bad fraction p of a source by its examples, not its reads: an
example needed a substitute exactly when the record drawn for it is bad, and draws are
uniform over the (shuffled) source, so bad_examples / examples estimates p whatever the
clustering of bad records (a run of 50 bad files costs 50 reads but is one bad draw). The
run stops only when the one-sided Wilson lower bound of p at `data.skip_guard_confidence`
exceeds `data.max_skip_fraction`, i.e. on evidence, not after a handful of unlucky reads:
with the defaults (10%, 0.9999) a source with 5% bad records essentially never stops,
one with 50% stops within a few dozen examples, an all-bad one at its first few.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.data import sources

# Rows of `batch_counts`.
EXAMPLES, BAD_EXAMPLES, SKIPPED = 0, 1, 2


class TooManySkippedError(Exception):
  """A source's bad fraction is, with the configured confidence, above the limit."""


def batch_counts(batch: Mapping[str, jax.Array], num_sources: int) -> jax.Array:
  """int32 [3, num_sources]: examples, examples that needed a substitute, records skipped,
  per source, over the (global) batch. batch["source"], batch["skipped"]: int32 [B]."""
  source, skipped = batch["source"], batch["skipped"]
  rows = jnp.stack([jnp.ones_like(skipped), (skipped > 0).astype(skipped.dtype), skipped])
  return jax.vmap(lambda r: jax.ops.segment_sum(r, source, num_segments=num_sources))(rows)


def wilson_lower_bound(bad: int, total: int, confidence: float) -> float:
  """One-sided lower confidence bound of a binomial proportion (Wilson score interval)."""
  if total <= 0:
    return 0.0
  z = statistics.NormalDist().inv_cdf(confidence)
  p = bad / total
  centre = p + z * z / (2 * total)
  margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
  return max(0.0, (centre - margin) / (1 + z * z / total))


class SkipAccount:
  """Cumulative per-source counts from step 1 on (restored from a checkpoint's `data`)."""

  def __init__(self, keys: Sequence[str], names: Sequence[str], *, max_fraction: float,
               confidence: float, restored: Mapping[str, Any] | None = None):
    self.keys, self.names = list(keys), list(names)
    self.max_fraction, self.confidence = float(max_fraction), float(confidence)
    self.counts = np.zeros((3, len(self.keys)), np.int64)
    for row, field in ((EXAMPLES, "examples"), (BAD_EXAMPLES, "bad_examples"),
                       (SKIPPED, "skipped")):
      stored = (restored or {}).get(field, {})
      self.counts[row] = [int(stored.get(k, 0)) for k in self.keys]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  restored: Mapping[str, Any] | None = None) -> "SkipAccount":
    keys = sources.active_source_keys(config)
    return cls(keys, [config.data.sources[k].name for k in keys],
               max_fraction=config.data.max_skip_fraction,
               confidence=config.data.skip_guard_confidence, restored=restored)

  def add(self, step_counts: np.ndarray) -> None:
    """Adds one step's `batch_counts`; raises TooManySkippedError per the guard."""
    self.counts += np.asarray(step_counts, np.int64)
    for k in range(len(self.keys)):
      self._check(k)

  def _check(self, k: int) -> None:
    examples, bad = int(self.counts[EXAMPLES, k]), int(self.counts[BAD_EXAMPLES, k])
    bound = wilson_lower_bound(bad, examples, self.confidence)
    if bad and bound > self.max_fraction:
      raise TooManySkippedError(
          f"source {self.keys[k]!r} ({self.names[k]}): {bad} of {examples} examples drew an "
          f"undecodable image or a blank caption ({bad / examples:.1%}; "
          f"{int(self.counts[SKIPPED, k])} records skipped in all), so its bad fraction is "
          f"above config data.max_skip_fraction={self.max_fraction:g} with "
          f"{self.confidence:.2%} confidence (at least {bound:.1%}): repair or drop those "
          "records (python -m mmjax.data.build lists them), or raise data.max_skip_fraction")

  @property
  def skipped(self) -> int:
    return int(self.counts[SKIPPED].sum())

  def metrics(self) -> dict[str, int]:
    """`data/skipped` (all sources) and per source `data/skipped/<key>` (records) and
    `data/read/<key>` (records read: examples + skipped), cumulative from step 1."""
    out = {"data/skipped": self.skipped}
    for k, key in enumerate(self.keys):
      out[f"data/skipped/{key}"] = int(self.counts[SKIPPED, k])
      out[f"data/read/{key}"] = int(self.counts[EXAMPLES, k] + self.counts[SKIPPED, k])
    return out

  def state(self) -> dict[str, dict[str, int]]:
    """JSON for the checkpoint's `data` item."""
    return {field: {key: int(self.counts[row, k]) for k, key in enumerate(self.keys)}
            for row, field in ((EXAMPLES, "examples"), (BAD_EXAMPLES, "bad_examples"),
                               (SKIPPED, "skipped"))}
