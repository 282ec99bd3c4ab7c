"""Memory against recompute per remat policy: CoCa base/large/giant, compiled ahead of time.

  PYTHONPATH=. python benchmarks/remat_policies.py [--target h100x8] [--variants base,large]
      [--policies none,full] [--per_device_batch 256] [--reports FILE.jsonl] [--write]

One `python -m mmjax.aot --json` run per (variant, policy), each in a fresh process, on the
variant's mesh preset for the target (`configs/coca.py:VARIANT,PRESET`) at the preset's
micro-batch per device, as ONE gradient step (`grad_accum_steps=1`, batch = the preset's
batch / grad_accum_steps): without gradient caching's embedding pass, `compiled/model` FLOPs
is the remat policy's recompute alone, and memory is one micro-batch's (an accumulating step
adds a parameter-sized gradient sum); `--per_device_batch N` compiles N examples per device
instead (batch = N x the preset's devices), into a table of its own. Attention is XLA's
(`model.attention_impl=xla`) so that XLA:GPU counts every attention FLOP. `--write` replaces
the target's table between the markers in benchmarks/RESULTS.md. The last stdout line is
one JSON list of the rows. Needs `pip install -e '.[tpu-aot,gpu-aot]'`.
"""
import argparse
import datetime
import json
import sys

import aot_presets  # benchmarks/aot_presets.py
from configs import coca as coca_configs
from mmjax import cli

GiB = 2**30
PRESET_OF_TARGET = {"v4-32": "v4_32", "v5p-128": "v5p_128", "h100x8": "h100x8"}
# Most memory first; the offload twins keep their activations in host memory.
# ("dots" is left out: scanned layers' "none" is "dots", layers.SCANNED_NONE_POLICY.)
POLICIES = ("none", "dots_with_no_batch_dims", "save_attention_recompute_mlp",
            "offload_attention_recompute_mlp", "save_qkv_proj", "offload_qkv_proj", "full")


def markers(target: str, per_device_batch: int = 0) -> tuple[str, str]:
  """The RESULTS.md markers of the target's table (one per `--per_device_batch`)."""
  name = target + (f" @{per_device_batch}" if per_device_batch else "")
  return f"<!-- remat_policies {name}:begin -->", f"<!-- remat_policies {name}:end -->"


def measure(variant: str, target: str, policy: str, timeout_s: int,
            per_device_batch: int = 0) -> dict:
  """One compile under `policy`, as a single step: the preset's global micro-batch (batch /
  grad_accum_steps), or `per_device_batch` examples on each of the preset's devices."""
  preset = PRESET_OF_TARGET[target]
  spec = f"configs/coca.py:{variant},{preset}"
  config = cli.load_config(spec)
  micro_batch = config.batch_size // config.grad_accum_steps
  if per_device_batch:
    micro_batch = per_device_batch * coca_configs.MESH_PRESETS[preset][1]
  report = aot_presets.run_one(spec, target, timeout_s, "--config.model.attention_impl=xla",
                               f"--config.model.remat_policy={policy}",
                               f"--config.batch_size={micro_batch}",
                               "--config.grad_accum_steps=1")
  return dict(report, variant=variant, policy=policy, target=target)


def host_bytes(r: dict) -> int | None:
  """Host memory (pinned_host: offloaded activations) per device, from XLA's analysis."""
  return (aot_presets.train_program(r).get("memory_analysis") or {}).get("host_temp")


def row(r: dict) -> str:
  name = r["variant"]
  if "error" in r:
    return f"| {name} | {r['policy']} | error: {r['error']} | | | | | | |"
  need, have = r["memory_per_device_bytes"], r["device_memory_bytes"]
  fits = (f"{100 * r['headroom_fraction']:.1f}%" if r["fits"] else "**no fit**")
  host = host_bytes(r)
  ratio = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") else "n/a"
  return (f"| {name} | {r['policy']} | {r['micro_batch_per_device']:g} | "
          f"{need / GiB:.2f} / {have / GiB:.2f} | {fits} | "
          f"{'' if not host else f'{host / GiB:.2f}'} | {ratio} | "
          f"{aot_presets.gib_cell(aot_presets.collective_bytes(r))} | "
          f"{r['lower_s'] + r['compile_s']:.0f} s |")


def command_flags(target: str, variants: str = "base,large,giant",
                  policies: str = ",".join(POLICIES), per_device_batch: int = 0) -> str:
  """The script's flags that made a table (defaults left out)."""
  flags = [f"--target {target}"]
  flags += [f"--variants {variants}"] if variants != "base,large,giant" else []
  flags += [f"--policies {policies}"] if policies != ",".join(POLICIES) else []
  flags += [f"--per_device_batch {per_device_batch}"] if per_device_batch else []
  return " ".join(flags)


def section(target: str, rows: list[str], versions: dict[str, str],
            per_device_batch: int = 0, flags: str = "") -> str:
  """The RESULTS.md section of one table; `flags`: the command's (default: the target's)."""
  begin, end = markers(target, per_device_batch)
  table_flags = command_flags(target, per_device_batch=per_device_batch)
  flags = flags or table_flags
  batch = (f"{per_device_batch} examples per device" if per_device_batch
           else "its micro-batch per device")
  return "\n".join([
      begin,
      f"### Remat policies on {target}" + (f", {batch}" if per_device_batch else "")
      + f" (`benchmarks/remat_policies.py {table_flags}`)",
      "",
      f"`PYTHONPATH=. python benchmarks/remat_policies.py {flags} --write`, "
      f"{datetime.date.today().isoformat()}, on {aot_presets.cpu_model()} (compiles for the "
      "target, no accelerator). Versions: "
      + ", ".join(f"{k} {v}" for k, v in versions.items()) + ". Each row: the variant's "
      f"`{PRESET_OF_TARGET[target]}` mesh preset at {batch}, as one "
      "gradient step (`grad_accum_steps=1`), XLA attention; memory per device against "
      "capacity; host: what the offload policies keep in host memory per device; "
      "compiled/model: matmul FLOPs in the compiled HLO over the model's, i.e. the policy's "
      "recompute; collectives: result bytes of every collective in the step per device "
      "(loops x trip count).",
      "",
      "| variant | remat policy | micro-batch per device | memory / capacity (GiB) | "
      "headroom | host (GiB) | compiled/model FLOPs | collectives (GiB) | compile |",
      "|---|---|---|---|---|---|---|---|---|",
      *rows,
      end])


def write(target: str, text: str, per_device_batch: int = 0) -> None:
  """Replaces the target's section of RESULTS.md, or appends it."""
  begin, end = markers(target, per_device_batch)
  with open(aot_presets.RESULTS) as f:
    current = f.read()
  head, found, rest = current.partition(begin)
  tail = rest.partition(end)[2] if found else "\n"
  if not found:
    head = current.rstrip("\n") + "\n\n"
  with open(aot_presets.RESULTS, "w") as f:
    f.write(head + text + tail)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--target", default="h100x8", choices=sorted(PRESET_OF_TARGET))
  parser.add_argument("--variants", default="base,large,giant")
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--per_device_batch", type=int, default=0, help="examples per device "
                      "in the step (default: the preset's micro-batch)")
  parser.add_argument("--timeout_s", type=int, default=3600, help="per compile")
  parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
  parser.add_argument("--reports", default="", help="append every full mmjax.aot report "
                      "to this JSONL file")
  args = parser.parse_args()
  results = []
  for variant in args.variants.split(","):
    for policy in args.policies.split(","):
      print(f"remat_policies: {variant} {policy} on {args.target} ...", file=sys.stderr,
            flush=True)
      results.append(measure(variant, args.target, policy, args.timeout_s,
                             args.per_device_batch))
      print(row(results[-1]), flush=True)
      if args.reports:
        with open(args.reports, "a") as f:
          f.write(json.dumps(results[-1]) + "\n")
  versions = next((r["versions"] for r in results if "versions" in r), {})
  flags = command_flags(args.target, args.variants, args.policies, args.per_device_batch)
  text = section(args.target, [row(r) for r in results], versions, args.per_device_batch, flags)
  if args.write:
    write(args.target, text, args.per_device_batch)
  print(text)
  print(json.dumps([{k: r.get(k) for k in (
      "variant", "policy", "target", "fits", "micro_batch_per_device", "memory_per_device_bytes",
      "device_memory_bytes", "headroom_fraction", "flops_ratio", "lower_s", "compile_s",
      "error")} | {"host_bytes": host_bytes(r),
                   "collective_bytes": aot_presets.collective_bytes(r)} for r in results]))


if __name__ == "__main__":
  main()
