"""The shapes ablation in one command: every preset x seed trained and evaluated in turn.

  nice -n 10 python benchmarks/ablation_shapes.py \\
      [--presets clip,unicl,unicl_prefix,coca_unicl_prefix] [--seeds 0,1,2] [--steps 800] \\
      [--workdir /tmp/mmjax_ablation_shapes] [--nice 10] [--tiny] [--probe]
      [--config.KEY=VALUE ...]

Each arm is a preset of configs/shapes.py with its 800-step schedule (`<preset>,long`; any
name in its PRESETS: adding a preset there adds an arm here, e.g. `--presets
clip,unicl,siglip`), trained from scratch for each seed
(`--config.seed`: parameters, data order, masks) with `python -m mmjax.train`, one run at a
time under `nice`, evaluated once at the last step:
  zeroshot      zero-shot top-1/top-5 on the 16 classes held out of training
                (shapes/labels_unseen, 1000 images, 16-way)
  seen_classes  closed-set top-1/top-5 on the 48 training classes (shapes/labels_seen
                validation, 500 images, 48-way)
  retrieval     image<->text R@1/5/10 on shapes/captions validation (500 images, 1500 texts)
  captioning    CIDEr / BLEU-4 (greedy), only for arms with a captioning loss
The linear probe is off (`--probe` turns it on): its float64 L-BFGS fits took longer than
the rest of the evaluation on the shared 2-core machine, and it is not what this ablation
compares.
Both zero-shot evaluators use the caption prefix (the paper's choice) in training's
evaluation; arms with a prefix (model.prefix_length > 0) are evaluated again on the same
checkpoint with the label prefix (`python -m mmjax.evaluate
--config.evals.zeroshot.prefix=label --config.evals.seen_classes.prefix=label`), so
"caption vs label prefix at test" compares identical weights.

A finished run is not repeated (its result file is kept under <workdir>/<preset>/seed<k>/):
rerunning the command after an interruption continues with the next run. Prints a table of
mean +- sample standard deviation over the seeds per arm, paired differences between
consecutive presets and between the two test prefixes (same seeds, so same data order),
and ends with one JSON line: every run's metrics, the summaries, the command, the date, the
machine (CPU model, load average before and after) and the code version.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402  benchmarks/common.py
from configs import shapes  # noqa: E402

CAPTION, LABEL = "caption", "label"
# Table columns: (heading, metric name). The names are those of configs/shapes.py's
# evaluators (the entry key, then the dataset).
COLUMNS = (
    ("unseen top-1", "zeroshot/shapes_labels_unseen/top1"),
    ("unseen top-5", "zeroshot/shapes_labels_unseen/top5"),
    ("seen top-1", "seen_classes/shapes_labels_seen/top1"),
    ("seen top-5", "seen_classes/shapes_labels_seen/top5"),
    ("i2t R@1", "retrieval/shapes_captions/i2t_r1"),
    ("i2t R@5", "retrieval/shapes_captions/i2t_r5"),
    ("t2i R@1", "retrieval/shapes_captions/t2i_r1"),
    ("t2i R@5", "retrieval/shapes_captions/t2i_r5"),
    ("CIDEr", "caption/shapes_captions/cider"),
    ("BLEU-4", "caption/shapes_captions/bleu4"),
    ("probe top-1", "linear_probe/shapes_labels/top1"),  # with --probe
)
ZERO_SHOT_KEYS = ("zeroshot", "seen_classes")  # the evaluators the test prefix applies to


def arm_name(preset: str, tiny: bool) -> str:
  """The arm's config argument: the 800-step schedule (",long"), or the smoke-test model."""
  return f"{preset},tiny" if tiny else f"{preset},long"


def arm_config(preset: str, tiny: bool) -> Any:
  return shapes.get_config(arm_name(preset, tiny))


def has_prefix(config: Any) -> bool:
  return int(config.model.prefix_length) > 0


def has_captioning(config: Any) -> bool:
  return float(config.loss.get("caption_weight", 0.0)) > 0


def train_overrides(config: Any, seed: int, steps: int, probe: bool,
                    extra: list[str]) -> list[str]:
  """One evaluation, at the last step; captioning only where a captioning loss trains."""
  out = [f"--config.seed={seed}", f"--config.total_steps={steps}",
         f"--config.eval_every_steps={steps}", f"--config.checkpoint_every_steps={steps}",
         f"--config.log_every_steps={min(50, steps)}"]
  if not has_captioning(config):
    out.append("--config.evals.captioning.num_examples=0")
  if not probe:
    out.append("--config.evals.linear_probe.num_examples=0")
  return out + extra


def label_prefix_overrides() -> list[str]:
  """The zero-shot evaluators again with the label prefix; nothing else."""
  return ([f"--config.evals.{k}.prefix={LABEL}" for k in ZERO_SHOT_KEYS]
          + [f"--config.evals.{k}.num_examples=0"
             for k in ("retrieval", "captioning", "linear_probe")])


def run_logged(command: list[str], log_path: str) -> tuple[int, float]:
  start = time.perf_counter()
  with open(log_path, "w") as log:
    log.write(" ".join(command) + "\n")
    log.flush()
    rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  return rc, time.perf_counter() - start


def log_tail(path: str, lines: int = 15) -> str:
  with open(path) as f:
    return "".join(f.readlines()[-lines:])


def logged_metrics(workdir: str, step: int) -> tuple[dict[str, float], dict[str, float]]:
  """(the trainer's evaluation at `step` or {}, the last training record) from metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evaluated = [r for r in records if r.get("step") == step and "loss" not in r
               and any("/" in k and not k.startswith("data/") for k in r)]
  trained = [r for r in records if "loss" in r]
  metrics = {k: v for k, v in evaluated[-1].items() if k != "step"} if evaluated else {}
  return metrics, {"train_loss": trained[-1]["loss"],
                   "examples_per_sec": trained[-1]["examples_per_sec"]}


def evaluate(command: list[str], workdir: str, step: int, name: str) -> dict[str, Any]:
  """Runs `mmjax.evaluate` (`command`); its results move to eval/step_<step>_<name>.json.
  Returns the metrics, or {"error": ...}."""
  log = os.path.join(workdir, f"evaluate_{name}.log")
  rc, _ = run_logged(command, log)
  if rc:
    return {"error": f"mmjax.evaluate exit {rc}: " + log_tail(log)}
  kept = os.path.join(workdir, "eval", f"step_{step}_{name}.json")
  os.replace(os.path.join(workdir, "eval", f"step_{step}.json"), kept)
  with open(kept) as f:
    return {k: v for k, v in json.load(f).items() if k != "step"}


def run_arm(args: argparse.Namespace, preset: str, seed: int) -> dict[str, Any]:
  """Trains (and evaluates) one preset x seed unless its result file exists."""
  workdir = os.path.join(args.workdir, preset, f"seed{seed}")
  result_path = os.path.join(workdir, "ablation_result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  config = arm_config(preset, args.tiny)
  name = f"configs/shapes.py:{arm_name(preset, args.tiny)}"
  base = ["nice", "-n", str(args.nice), sys.executable, "-m"]
  common = [f"--config={os.path.join(REPO, name)}", f"--workdir={workdir}"]
  overrides = train_overrides(config, seed, args.steps, args.probe, args.overrides)
  result: dict[str, Any] = {"preset": preset, "seed": seed, "steps": args.steps,
                            "workdir": workdir}
  rc, wall = run_logged(base + ["mmjax.train"] + common + overrides,
                        os.path.join(workdir, "train.log"))
  result["train_wall_s"] = round(wall, 1)
  if rc:
    return {**result, "error": f"mmjax.train exit {rc}: "
            + log_tail(os.path.join(workdir, "train.log"))}
  evaluated, trained = logged_metrics(workdir, args.steps)
  result.update(trained)
  evaluate_command = base + ["mmjax.evaluate"] + common + overrides
  if not evaluated:  # stopped during its final evaluation: the checkpoint is complete
    evaluated = evaluate(evaluate_command, workdir, args.steps, "caption_prefix")
    result["evaluated_from_checkpoint"] = True
  if "error" in evaluated:
    return {**result, **evaluated}
  result[CAPTION] = evaluated
  if has_prefix(config):
    start = time.perf_counter()
    evaluated = evaluate(evaluate_command + label_prefix_overrides(), workdir, args.steps,
                         "label_prefix")
    result["label_eval_wall_s"] = round(time.perf_counter() - start, 1)
    if "error" in evaluated:
      return {**result, **evaluated}
    result[LABEL] = evaluated
  with open(result_path, "w") as f:
    json.dump(result, f, indent=1)
  return result


# --- summaries (pure functions of the results: tested without training) --------------------
def mean_std(values: list[float]) -> dict[str, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value) of `values`."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "n": int(len(v))}


def arms(results: list[dict[str, Any]], presets: list[str]) -> list[tuple[str, str]]:
  """(preset, test prefix) pairs present in `results`, in preset order."""
  out = []
  for preset in presets:
    for prefix in (CAPTION, LABEL):
      if any(r["preset"] == preset and prefix in r for r in results):
        out.append((preset, prefix))
  return out


def per_seed(results: list[dict[str, Any]], preset: str, prefix: str,
             metric: str) -> dict[int, float]:
  return {r["seed"]: r[prefix][metric] for r in results
          if r["preset"] == preset and prefix in r and metric in r[prefix]}


def summarize(results: list[dict[str, Any]], presets: list[str]) -> dict[str, Any]:
  """Per arm: mean/std/n of every table metric. Paired differences (same seeds): each preset
  minus the previous one (caption prefix), and caption minus label prefix per preset."""
  metrics = [m for _, m in COLUMNS]
  summary = {}
  for preset, prefix in arms(results, presets):
    summary[f"{preset}/{prefix}"] = {
        m: mean_std(list(values.values())) for m in metrics
        if (values := per_seed(results, preset, prefix, m))}
  pairs = [((b, CAPTION), (a, CAPTION)) for a, b in zip(presets, presets[1:])]
  pairs += [((p, CAPTION), (p, LABEL)) for p in presets]
  differences = {}
  for (p1, x1), (p2, x2) in pairs:
    diffs = {}
    for m in metrics:
      first, second = per_seed(results, p1, x1, m), per_seed(results, p2, x2, m)
      seeds = sorted(set(first) & set(second))
      if seeds:
        diffs[m] = {**mean_std([first[s] - second[s] for s in seeds]), "seeds": seeds}
    if diffs:
      differences[f"{p1}/{x1} - {p2}/{x2}"] = diffs
  return {"arms": summary, "paired_differences": differences}


def format_tables(summary: dict[str, Any]) -> str:
  """Markdown: one row per arm (mean +- std, n), then the paired differences."""
  used = [(h, m) for h, m in COLUMNS
          if any(m in arm for arm in summary["arms"].values())]

  def cell(stats: dict[str, float] | None, signed: bool = False) -> str:
    if stats is None:
      return "-"
    sign = "+" if signed else ""
    return f"{stats['mean']:{sign}.3f} ± {stats['std']:.3f}"

  lines = []
  for title, rows in (("arm (test prefix)", summary["arms"]),
                      ("paired difference", summary["paired_differences"])):
    lines += ["", "| " + title + " | n | " + " | ".join(h for h, _ in used) + " |",
              "|---" * (len(used) + 2) + "|"]
    for name, stats in rows.items():
      n = max((s["n"] for s in stats.values()), default=0)
      lines.append(f"| {name} | {n} | " + " | ".join(
          cell(stats.get(m), signed=rows is summary["paired_differences"]) for _, m in used)
          + " |")
  return "\n".join(lines)


def code_version() -> str:
  def git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
  return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="clip,unicl,unicl_prefix,coca_unicl_prefix",
                      help=f"comma-separated, from configs/shapes.py {shapes.PRESETS}")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--workdir", default="/tmp/mmjax_ablation_shapes")
  parser.add_argument("--nice", type=int, default=10)
  parser.add_argument("--tiny", action="store_true",
                      help="the presets' ',tiny' models (smoke test, seconds per run)")
  parser.add_argument("--probe", action="store_true",
                      help="also the linear probe (64 classes of shapes/labels)")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (config overrides are --config.KEY=VALUE)")
  args.overrides = overrides
  args.presets = [p for p in args.presets.split(",") if p]
  unknown = [p for p in args.presets if p not in shapes.PRESETS]
  if unknown:
    parser.error(f"--presets: {unknown} not in configs/shapes.py PRESETS {shapes.PRESETS}")
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  return args


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  started = datetime.datetime.now(datetime.timezone.utc)
  load_before = os.getloadavg()
  plan = [(p, s) for s in args.seeds for p in args.presets]  # every arm once per seed first
  results, t0 = [], time.perf_counter()
  for i, (preset, seed) in enumerate(plan):
    print(f"[{i + 1}/{len(plan)}] {preset} seed {seed} ...", file=sys.stderr, flush=True)
    result = run_arm(args, preset, seed)
    results.append(result)
    elapsed = time.perf_counter() - t0
    status = result.get("error", "").splitlines()[0] if "error" in result else (
        f"unseen top-1 {result[CAPTION].get(COLUMNS[0][1], float('nan')):.3f}")
    print(f"[{i + 1}/{len(plan)}] {preset} seed {seed}: {status} "
          f"(train {result.get('train_wall_s', 0):.0f} s; elapsed {elapsed / 60:.1f} min)",
          file=sys.stderr, flush=True)
  ok = [r for r in results if "error" not in r]
  summary = summarize(ok, args.presets)
  print(format_tables(summary))
  report = {
      "benchmark": "ablation_shapes", "command": " ".join([sys.executable, *sys.argv]),
      "started_utc": started.isoformat(timespec="seconds"),
      "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "wall_s": round(time.perf_counter() - t0, 1), "cpu": common.cpu_model(),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      "code": code_version(), "presets": args.presets, "seeds": args.seeds,
      "steps": args.steps, "tiny": args.tiny, "probe": args.probe,
      "overrides": args.overrides,
      "runs": results, **summary}
  print(json.dumps(report))
  return 1 if len(ok) < len(results) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
