"""The README's default-run figures, regenerated: train the README's main job, the same job
at random init, evaluate the checkpoint, and check that a repeat gives the same numbers.

  python benchmarks/readme_figures.py --workdir /tmp/readme_figures [--repeats 2]
      [--cpus 0] [--config configs/shapes.py] [--write_readme]

Run it from a fresh clone after the README's first command (which installs the venv): every
figure then comes from the code and data as shipped. Each repeat trains from scratch in its
own work directory (the dataset and tokenizer caches of ~/.cache/mmjax are shared; the XLA
compilation cache is off, so a repeat recompiles like a first run). `--cpus 0` pins one
extra repeat to those CPUs with `taskset`, to see whether the figures depend on the number of
cores XLA's CPU backend splits its work over. `--write_readme` replaces the table between the
README's `<!-- readme_figures -->` markers. Prints the table and ends with one JSON line.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- readme_figures -->"
# Table rows: (label, metrics as (name prefix, name suffix) of `<prefix>/<dataset>/<suffix>`,
# joined by " / "); rows whose metrics the config does not produce are left out.
ROWS = (
    ("zero-shot top-1 / top-5 (16 held-out classes)", (("zeroshot", "top1"),
                                                        ("zeroshot", "top5"))),
    ("seen classes top-1 / top-5 (48 training classes, closed set)",
     (("seen_classes", "top1"), ("seen_classes", "top5"))),
    ("retrieval image->text R@1 / R@5 / R@10", (("retrieval", "i2t_r1"), ("retrieval", "i2t_r5"),
                                                ("retrieval", "i2t_r10"))),
    ("retrieval text->image R@1 / R@5 / R@10", (("retrieval", "t2i_r1"), ("retrieval", "t2i_r5"),
                                                ("retrieval", "t2i_r10"))),
    ("captioning CIDEr / BLEU-4 (greedy)", (("caption", "cider"), ("caption", "bleu4"))),
    ("linear probe top-1 (logistic, frozen image_features)", (("linear_probe", "top1"),)),
)


def cpu_model() -> str:
  flags, model = "", platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and not model.strip():
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
          flags = line
          break
  except OSError:
    pass
  isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
  return f"{model or 'unknown CPU'} ({isa}, {os.cpu_count()} CPUs)"


def train(config: str, workdir: str, overrides: list[str], cpus: str) -> float:
  """Runs mmjax.train to completion; returns its wall seconds."""
  command = [sys.executable, "-m", "mmjax.train", f"--config={config}",
             f"--workdir={workdir}", "--config.compilation_cache_dir=", *overrides]
  if cpus:
    command = ["taskset", "-c", cpus, *command]
  start = time.time()
  print("$", " ".join(command), flush=True)
  subprocess.run(command, cwd=REPO, check=True)
  return time.time() - start


def final_eval(workdir: str) -> dict[str, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  evals = [m for m in logged if any(k.startswith("retrieval/") for k in m)]
  losses = [m for m in logged if "loss" in m]
  return {**evals[-1], "loss": losses[-1]["loss"]}


def _metric(metrics: dict[str, float], prefix: str, suffix: str) -> str | None:
  return next((k for k in sorted(metrics) if k.startswith(prefix + "/")
               and k.endswith("/" + suffix) and k.count("/") == 2), None)


def table(trained: dict[str, float], random_init: dict[str, float], steps: int) -> str:
  lines = [f"| metric | trained ({steps} steps) | random init |", "|---|---|---|"]
  for label, parts in ROWS:
    keys = [_metric(trained, prefix, suffix) for prefix, suffix in parts]
    if None in keys:
      continue
    value = lambda m: " / ".join(f"{m[k]:.3f}" for k in keys)
    lines.append(f"| {label} | {value(trained)} | {value(random_init)} |")
  return "\n".join(lines)


def write_readme(block: str) -> None:
  path = os.path.join(REPO, "README.md")
  with open(path) as f:
    text = f.read()
  start, end = text.index(MARKER), text.rindex(MARKER)
  with open(path, "w") as f:
    f.write(text[:start + len(MARKER)] + "\n" + block + "\n" + text[end:])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/shapes.py")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--cpus", default="", help="also one repeat pinned to these CPUs")
  parser.add_argument("--write_readme", action="store_true")
  args = parser.parse_args()

  runs = {}
  plan = [(f"trained_{i}", [], "") for i in range(args.repeats)]
  plan.append(("random_init", ["--config.total_steps=1"], ""))
  if args.cpus:
    plan.append((f"trained_cpus_{args.cpus}", [], args.cpus))
  for name, overrides, cpus in plan:
    workdir = os.path.join(args.workdir, name)
    if os.path.exists(workdir):
      raise SystemExit(f"{workdir} exists: give an empty --workdir")
    seconds = train(args.config, workdir, overrides, cpus)
    runs[name] = {"wall_s": round(seconds, 1), **final_eval(workdir)}

  first = runs["trained_0"]
  steps = int(first["step"])
  metric_keys = [k for k in first if k not in ("step", "wall_s")]
  same = {name: all(runs[name][k] == first[k] for k in metric_keys)
          for name in runs if name.startswith("trained")}
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
  header = (f"Measured {datetime.date.today()} on {cpu_model()}, commit {commit}, with "
            f"`python benchmarks/readme_figures.py --workdir W --repeats {args.repeats}"
            + (f" --cpus {args.cpus}" if args.cpus else "") + "` (training "
            f"{first['wall_s'] / 60:.1f} min for {steps} steps with its evaluations"
            + ("" if len(same) < 2 else "; every repeat gave identical figures"
               if all(same.values()) else
               "; repeats differ: " + ", ".join(n for n, ok in same.items() if not ok))
            + "):")
  block = header + "\n\n" + table(first, runs["random_init"], steps)
  print("\n" + block)
  if args.write_readme:
    write_readme(block)
  print(json.dumps({"cpu": cpu_model(), "commit": commit, "identical_repeats": same,
                    "runs": {k: {m: v[m] for m in ("wall_s", "loss", *metric_keys) if m in v}
                             for k, v in runs.items()}}))


if __name__ == "__main__":
  main()
