"""Patch dropout on the shapes job at equal wall time: 0.5 dropped vs none, 3 seeds each.

  PYTHONPATH=. python benchmarks/patch_dropout_shapes.py --step_time_ratio R \
      [--steps 250] [--fraction 0.5] [--seeds 0,1,2] [--workdir /tmp/mmjax_patch_dropout_shapes]

Equal wall time: the baseline trains `--steps` steps of configs/shapes.py (the default
first run: CoCa + UniCL + prefixes, batch 64, 250 steps, warm-up 25); the dropout arm
trains round(steps / R) steps, R being the step-time ratio (dropout / none) that
`benchmarks/patch_dropout.py time` measured for this model, so both arms get the same
training compute time (start-up, compile and evaluation excluded). Each arm's schedule
(cosine to total_steps) spans its own steps, as a run given that budget would. Every run is
`python -m mmjax.train` from scratch with `--config.seed`, one at a time under `nice`,
seeds interleaved (seed 0 both arms, then seed 1 ...), evaluated once at its last step:
held-out-class zero-shot (`zeroshot/shapes_labels_unseen`: the 16 classes no training label
names, 1000 images, 16-way), seen-class top-1 and retrieval; captioning evaluation is off
(not what is compared here; it costs a decode compile per run). A finished run is not
repeated (its result file stays under <workdir>/<arm>/seed<k>/). Prints per arm mean and
sample standard deviation, the paired differences (same seed: same initialisation and
data order), and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ablation_shapes as ablation  # noqa: E402  benchmarks/ablation_shapes.py
import common  # noqa: E402  benchmarks/common.py
from configs import shapes  # noqa: E402

METRICS = ("zeroshot/shapes_labels_unseen/top1", "zeroshot/shapes_labels_unseen/top5",
           "seen_classes/shapes_labels_seen/top1", "retrieval/shapes_captions/i2t_r1",
           "retrieval/shapes_captions/t2i_r1")
HELD_OUT = METRICS[0]


def run_arm(args: argparse.Namespace, fraction: float, steps: int, seed: int) -> dict[str, Any]:
  """Trains and evaluates one arm x seed unless its result file exists."""
  arm = f"patch_dropout_{fraction}"
  workdir = os.path.join(args.workdir, arm, f"seed{seed}")
  result_path = os.path.join(workdir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  config = shapes.get_config(None)
  overrides = ablation.train_overrides(config, seed, steps, False, [
      f"--config.model.patch_dropout={fraction}", "--config.evals.captioning.num_examples=0",
      *args.overrides])
  command = ["nice", "-n", str(args.nice), sys.executable, "-m", "mmjax.train",
             f"--config={os.path.join(REPO, 'configs/shapes.py')}", f"--workdir={workdir}",
             *overrides]
  result: dict[str, Any] = {"arm": arm, "fraction": fraction, "seed": seed, "steps": steps,
                            "workdir": workdir}
  rc, wall = ablation.run_logged(command, os.path.join(workdir, "train.log"))
  result["run_wall_s"] = round(wall, 1)
  if rc:
    return {**result, "error": f"mmjax.train exit {rc}: "
            + ablation.log_tail(os.path.join(workdir, "train.log"))}
  evaluated, trained = ablation.logged_metrics(workdir, steps)
  if not evaluated:
    return {**result, "error": "no evaluation at the last step in metrics.jsonl"}
  result.update(trained, metrics={m: evaluated[m] for m in METRICS if m in evaluated})
  with open(result_path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def summarize(results: list[dict[str, Any]], fractions: tuple[float, float]) -> dict[str, Any]:
  """Per arm mean/std/n of each metric; paired (same seed) differences dropout - none."""
  by = {f: {r["seed"]: r["metrics"] for r in results if r["fraction"] == f} for f in fractions}
  arms = {str(f): {m: ablation.mean_std([v[m] for v in by[f].values()]) for m in METRICS
                   if by[f] and all(m in v for v in by[f].values())} for f in fractions}
  seeds = sorted(set(by[fractions[0]]) & set(by[fractions[1]]))
  paired = {m: {**ablation.mean_std([by[fractions[1]][s][m] - by[fractions[0]][s][m]
                                     for s in seeds]), "seeds": seeds}
            for m in METRICS if seeds and all(m in by[f][s] for f in fractions for s in seeds)}
  return {"arms": arms, "paired_difference": paired}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--step_time_ratio", type=float, required=True,
                      help="dropout / none step time, from benchmarks/patch_dropout.py time")
  parser.add_argument("--steps", type=int, default=shapes.SHORT_STEPS)
  parser.add_argument("--fraction", type=float, default=0.5)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workdir", default="/tmp/mmjax_patch_dropout_shapes")
  parser.add_argument("--nice", type=int, default=10)
  args, args.overrides = parser.parse_known_args(argv)
  bad = [o for o in args.overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (config overrides are --config.KEY=VALUE)")
  if not 0 < args.step_time_ratio <= 1.5:
    parser.error(f"--step_time_ratio={args.step_time_ratio}: expected a measured ratio")
  fractions = (0.0, args.fraction)
  steps = {0.0: args.steps, args.fraction: round(args.steps / args.step_time_ratio)}
  started, load_before = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
  plan = [(f, s) for s in (int(x) for x in args.seeds.split(",")) for f in fractions]
  results, t0 = [], time.perf_counter()
  for i, (fraction, seed) in enumerate(plan):
    result = run_arm(args, fraction, steps[fraction], seed)
    results.append(result)
    status = result["error"].splitlines()[0] if "error" in result else (
        f"held-out zero-shot top-1 {result['metrics'][HELD_OUT]:.3f}")
    print(f"[{i + 1}/{len(plan)}] patch_dropout={fraction} seed {seed}, {steps[fraction]} "
          f"steps: {status} (run {result.get('run_wall_s', 0):.0f} s; elapsed "
          f"{(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr, flush=True)
  ok = [r for r in results if "error" not in r]
  summary = summarize(ok, fractions)
  for f in fractions:
    stats = summary["arms"][str(f)].get(HELD_OUT)
    if stats:
      print(f"patch_dropout={f}, {steps[f]} steps: held-out zero-shot top-1 "
            f"{stats['mean']:.3f} ± {stats['std']:.3f} (n={stats['n']})")
  if HELD_OUT in summary["paired_difference"]:
    d = summary["paired_difference"][HELD_OUT]
    print(f"paired difference (dropout - none): {d['mean']:+.3f} ± {d['std']:.3f}")
  print(json.dumps({
      "benchmark": "patch_dropout_shapes", "command": " ".join([sys.executable, *sys.argv]),
      "started_utc": started.isoformat(timespec="seconds"),
      "wall_s": round(time.perf_counter() - t0, 1), "cpu": common.cpu_model(),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      "code": ablation.code_version(), "step_time_ratio": args.step_time_ratio,
      "steps": {str(f): s for f, s in steps.items()}, "overrides": args.overrides,
      "runs": results, **summary}))
  return 1 if len(ok) < len(results) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
