"""The skip report of a WebDataset build: counts per shard and in total, by cause (every
sample read is written, skipped or filtered), why a build must not be published, and the
summary printed at the end. Written as `build_report.json` inside the dataset directory."""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from etils import epath

from mmjax.ingest import webdataset
from mmjax.ingest.options import REPORT_FILE, VERSION, BuildOptions

def _totals(per_shard: list[dict[str, Any]], layout: str) -> dict[str, Any]:
  """Counts over all shards, every cause of the layout listed (zeros too)."""
  other = ({webdataset.NO_CAPTION, webdataset.CAPTION_NOT_UTF8, webdataset.CAPTION_TOO_SHORT,
            webdataset.CAPTION_TOO_LONG} if layout == "label"
           else {webdataset.NO_LABEL, webdataset.UNKNOWN_CLASS})
  skipped = {c: sum(s["skipped"].get(c, 0) for s in per_shard)
             for c in webdataset.SKIP_CAUSES if c not in other}
  filtered = {c: sum(s["filtered"].get(c, 0) for s in per_shard)
              for c in webdataset.FILTER_CAUSES if c not in other}
  status = collections.Counter(s["status"] for s in per_shard)
  return {
      "shards": {"total": len(per_shard), "ok": status["ok"], "truncated": status["truncated"],
                 "unreadable": status["unreadable"]},
      "samples": {"read": sum(s["read"] for s in per_shard),
                  "written": sum(s["written"] for s in per_shard),
                  "skipped": skipped, "filtered": filtered}}


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
  return {cause: n for cause, n in sorted(counts.items()) if n}


def make_report(options: BuildOptions, per_shard: list[dict[str, Any]],
                class_names: Sequence[str] | None) -> dict[str, Any]:
  """The build report: options, totals, and every shard's counts (non-zero causes only).
  Deterministic: no times or paths of temporary files."""
  shards = [{"shard": s["shard"], "status": s["status"], "error": s["error"], "read": s["read"],
             "written": s["written"], "skipped": _nonzero(s["skipped"]),
             "filtered": _nonzero(s["filtered"])}
            for s in sorted(per_shard, key=lambda s: s["index"])]
  rules = dataclasses.asdict(options.rules)
  report = {"dataset": options.name, "version": VERSION, "layout": options.layout,
            "pattern": options.pattern,
            "options": {**rules, "class_names_file": options.class_names_file,
                        "dedupe_images": options.dedupe_images,
                        "fail_on_skip": options.fail_on_skip},
            **_totals(per_shard, options.layout)}
  if class_names is not None:
    report["num_classes"] = len(class_names)
  report["per_shard"] = shards
  return report


def outcome_line(totals: dict[str, Any]) -> str:
  samples, shards = totals["samples"], totals["shards"]
  parts = [f"{n} {c}" for kind in ("skipped", "filtered") for c, n in samples[kind].items() if n]
  return (f"{shards['total']} shards ({shards['unreadable']} unreadable, {shards['truncated']} "
          f"truncated), {samples['read']} samples read, {samples['written']} written"
          + (f" ({', '.join(parts)})" if parts else ""))


def failure(report: dict[str, Any], per_shard: list[dict[str, Any]], options: BuildOptions,
             final: epath.Path) -> str:
  """Why the build must not be published ("" if it may be)."""
  fatal = [s["fatal"] for s in sorted(per_shard, key=lambda s: s["index"]) if s["fatal"]]
  if fatal:
    return fatal[0]
  if report["shards"]["unreadable"] == len(per_shard):
    first = report["per_shard"][0]
    return (f"no readable shard among the {len(per_shard)} matching {options.pattern!r} "
            f"(first: {first['shard']}: {first['error']})")
  if report["samples"]["written"] == 0:
    return f"no sample survived: {outcome_line(report)}"
  if final.exists():
    return f"{final} appeared during the build; remove one of the two"
  return ""


def summary_text(report: dict[str, Any], data_dir: str) -> str:
  source = "labels" if report["layout"] == "label" else "captions"
  directory = os.path.join(data_dir, report["dataset"], report["version"])
  return "\n".join([
      f"Built {report['dataset']} ({report['layout']}) in {directory}: {outcome_line(report)}",
      f"  report: {os.path.join(directory, REPORT_FILE)}",
      f"  train on it: --config.data.sources.{source}.name={report['dataset']} "
      f"--config.data.sources.{source}.data_dir={data_dir}"])
