"""Checkpoint save time per tier on one process: persistent (`<workdir>/checkpoints`, all
items, sealed) vs local (`checkpoint.local_dir`: this process's shards and the data position,
sealed; with one process there is no peer to copy to).

  PYTHONPATH=. nice -n 10 python benchmarks/checkpoint_tiers.py \
      [--config configs/shapes.py:coca_unicl_prefix] [--saves 5] \
      [--workdir /tmp/mmjax_ckpt_bench] [--local_dir /dev/shm/mmjax_ckpt_bench]

Per save: `blocking_s`, the time the training loop is held by `save` (async: the device to
host copy), and `committed_s`, until the step is on disk and sealed (what a kill -9 right
after would still find). Saves alternate between the tiers (the machine is shared); medians
are reported. The last line is one JSON object, with the CPU model and the load average.
"""
import argparse
import json
import os
import shutil
import statistics
import time

import jax

import common  # benchmarks/common.py: cpu_model
from mmjax import checkpoint, cli, local_checkpoint, runtime
from mmjax.data import accounting


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/shapes.py:coca_unicl_prefix")
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--workdir", default="/tmp/mmjax_ckpt_bench")
  parser.add_argument("--local_dir", default="/dev/shm/mmjax_ckpt_bench")
  args = parser.parse_args()
  config = cli.load_config(args.config)
  for folder in (args.workdir, args.local_dir):
    shutil.rmtree(folder, ignore_errors=True)
  rt = runtime.build(config)
  times = {"persistent": [], "local": []}
  with rt.activate():
    state = rt.init_state()
    state_mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20
    persistent = checkpoint.Checkpointer(args.workdir, config)
    local = local_checkpoint.LocalCheckpoints(args.local_dir, args.workdir)
    local.resume_step(local_checkpoint.layout_of(rt.abstract_state), None)
    data = accounting.SkipAccount.from_config(config, None).state()
    for i in range(args.saves):
      step = 2 * i + 1
      start = time.perf_counter()
      persistent.save(step, state, config, data=data)
      held = time.perf_counter() - start
      persistent.wait()
      times["persistent"].append((held, time.perf_counter() - start))
      start = time.perf_counter()
      local.save(step + 1, state, data=data)
      held = time.perf_counter() - start
      local.replicate()
      times["local"].append((held, time.perf_counter() - start))
    persistent.close()
    local.close()
  out = {"config": args.config, "state_mib": round(state_mib, 1), "saves": args.saves,
         "cpu": common.cpu_model(), "load": os.getloadavg()[0],
         "workdir": args.workdir, "local_dir": args.local_dir}
  for tier, pairs in times.items():
    out[f"{tier}_blocking_s"] = round(statistics.median(p[0] for p in pairs), 4)
    out[f"{tier}_committed_s"] = round(statistics.median(p[1] for p in pairs), 4)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
