"""The README's default-run figures, regenerated: train the README's main job on a fresh
data_dir (as a newcomer's first run: the shapes data and tokenizer are built, the step is
compiled), the same job at random init, and check that a repeat gives the same numbers.

  python benchmarks/readme_figures.py --workdir /tmp/readme_figures [--repeats 2]
      [--cpus 0] [--config configs/shapes.py] [--write_readme]

Run it from a fresh clone after the README's first command (which installs the venv): every
figure then comes from the code and data as shipped. Each repeat trains from scratch in its
own work directory; the first builds the data and tokenizer into WORKDIR/data, the others
reuse them; the XLA compilation cache is off, so every run compiles like a first run.
The first run's wall time is split, from its timestamped output and metrics.jsonl, into data
build (the "Built shapes/..." lines), training steps (examples/s of each logged interval),
evaluation (from the progress line before an evaluation to its last output line) and the
rest (imports, tokenizer, compile, checkpoints). `--cpus 0` pins one extra repeat to those
CPUs with `taskset`, to see whether the figures depend on the number of cores XLA's CPU
backend splits its work over. `--write_readme` replaces the table between the README's
`<!-- readme_figures -->` markers. Prints the table and ends with one JSON line (with the
load average before and after: a shared machine's wall times are inflated).
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
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


def train(config: str, workdir: str, data_dir: str, overrides: list[str],
          cpus: str, batch_size: int) -> dict[str, float]:
  """Runs mmjax.train to completion, echoing its output; returns its wall seconds, split."""
  command = [sys.executable, "-m", "mmjax.train", f"--config={config}",
             f"--workdir={workdir}", f"--config.data_dir={data_dir}",
             "--config.compilation_cache_dir=", *overrides]
  if cpus:
    command = ["taskset", "-c", cpus, *command]
  print("$", " ".join(command), flush=True)
  start, lines, cpu = time.time(), [], cpu_seconds()
  with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as proc:
    for line in proc.stdout:
      lines.append((time.time() - start, line.rstrip("\n")))
      print(line, end="", flush=True)
  if proc.returncode:
    raise SystemExit(f"mmjax.train exited with {proc.returncode}")
  return {**split_wall_time(time.time() - start, lines, workdir, batch_size),
          "cpu_s": round(cpu_seconds() - cpu, 1)}


def cpu_seconds() -> float:
  """User + system CPU seconds of the finished child processes: on a shared machine the
  steadier measure of the work done (a run whose CPU seconds are under 5 minutes takes at
  most about that long alone on the machine, less where XLA uses both cores)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def split_wall_time(total: float, lines: list[tuple[float, str]], workdir: str,
                    batch_size: int) -> dict[str, float]:
  """Total seconds -> data build, training steps, evaluation and the rest (see the module
  docstring); `lines` are (seconds since start, line) of the run's output."""
  build = sum(float(m.group(1)) for _, line in lines
              if (m := re.match(r"Built \S+ .* in (\d+) s$", line)))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  training, previous = 0.0, 0
  for m in logged:
    if "examples_per_sec" in m:
      training += (m["step"] - previous) * batch_size / m["examples_per_sec"]
      previous = m["step"]
  evaluation, step_line = 0.0, None
  for i, (t, line) in enumerate(lines):
    if re.match(r"step \d+/\d+ ", line):
      step_line = t
    elif step_line is not None and (i + 1 == len(lines)
                                    or re.match(r"step \d+/\d+ ", lines[i + 1][1])):
      evaluation += t - step_line  # the output after a step line: its evaluation
      step_line = None
  seconds = {"wall_s": total, "data_build_s": build, "train_steps_s": training,
             "eval_s": evaluation, "rest_s": total - build - training - evaluation}
  return {k: round(v, 1) for k, v in seconds.items()}


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

  sys.path.insert(0, REPO)
  from mmjax import cli  # pylint: disable=import-outside-toplevel (after the path is set)
  batch = cli.load_config(args.config).batch_size
  load_before = os.getloadavg()
  runs, timings = {}, {}
  plan = [(f"trained_{i}", [], "") for i in range(args.repeats)]
  plan.append(("random_init", ["--config.total_steps=1"], ""))
  if args.cpus:
    plan.append((f"trained_cpus_{args.cpus}", [], args.cpus))
  data_dir = os.path.join(args.workdir, "data")  # fresh: the first run builds it
  if os.path.exists(data_dir):
    raise SystemExit(f"{data_dir} exists: give an empty --workdir")
  for name, overrides, cpus in plan:
    workdir = os.path.join(args.workdir, name)
    if os.path.exists(workdir):
      raise SystemExit(f"{workdir} exists: give an empty --workdir")
    timings[name] = train(args.config, workdir, data_dir, overrides, cpus, batch)
    runs[name] = {"wall_s": timings[name]["wall_s"], **final_eval(workdir)}
  load_after = os.getloadavg()

  first = runs["trained_0"]
  steps = int(first["step"])
  metric_keys = [k for k in first if k not in ("step", "wall_s")]
  same = {name: all(runs[name][k] == first[k] for k in metric_keys)
          for name in runs if name.startswith("trained")}
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
  t = timings["trained_0"]
  header = (f"Measured {datetime.date.today()} on {cpu_model()} (load average "
            f"{load_before[0]:.1f} before, {load_after[0]:.1f} after), commit {commit}, with "
            f"`python benchmarks/readme_figures.py --workdir W --repeats {args.repeats}"
            + (f" --cpus {args.cpus}" if args.cpus else "")
            + ("" if args.config == "configs/shapes.py" else f" --config {args.config}")
            + f"`: the first run, on a fresh data_dir, took {t['wall_s'] / 60:.1f} min "
            f"(data build {t['data_build_s']:.0f} s, {steps} training steps "
            f"{t['train_steps_s']:.0f} s, evaluation {t['eval_s']:.0f} s, start-up and "
            f"compile {t['rest_s']:.0f} s; {t['cpu_s'] / 60:.1f} CPU-minutes)"
            + ("" if len(same) < 2 else "; every repeat gave identical figures"
               if all(same.values()) else
               "; repeats differ: " + ", ".join(n for n, ok in same.items() if not ok))
            + ":")
  block = header + "\n\n" + table(first, runs["random_init"], steps)
  print("\n" + block)
  if args.write_readme:
    write_readme(block)
  print(json.dumps({"cpu": cpu_model(), "commit": commit, "identical_repeats": same,
                    "loadavg_before": load_before, "loadavg_after": load_after,
                    "timings": timings,
                    "runs": {k: {m: v[m] for m in ("wall_s", "loss", *metric_keys) if m in v}
                             for k, v in runs.items()}}))


if __name__ == "__main__":
  main()
