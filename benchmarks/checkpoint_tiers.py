"""Checkpoint save time per tier: persistent (`<workdir>/checkpoints`, all items, sealed)
vs local (`checkpoint.local_dir`: each process's shards and the data position, sealed, and
with several processes copied to the next one).

  PYTHONPATH=. nice -n 10 python benchmarks/checkpoint_tiers.py \
      [--config configs/shapes.py:coca_unicl_prefix] [--saves 5] \
      [--workdir /tmp/mmjax_ckpt_bench] [--local_dir /dev/shm/mmjax_ckpt_bench]
  # two processes on this machine (the state sharded over both: mesh.shape (1,-1,1)):
  for i in 0 1; do JAX_NUM_CPU_DEVICES=1 PYTHONPATH=. python benchmarks/checkpoint_tiers.py \
      --num_processes 2 --process_id $i --coordinator 127.0.0.1:12399 & done; wait

Per save: `blocking_s`, the time the training loop is held by `save` (async: the device to
host copy), and `committed_s`, until the step is on disk and sealed (what a kill -9 right
after would still find); for the local tier that includes the copy to the peer, and
`local_write_only_committed_s` is the write alone (before sealing and copying). Saves alternate between the tiers (the machine is shared); medians
are reported. The last line is one JSON object, with the CPU model and the load average.
"""
import argparse
import json
import os
import shutil
import statistics
import time

import jax
from jax.experimental import multihost_utils

import common  # benchmarks/common.py: cpu_model
from mmjax import checkpoint, cli, local_checkpoint, runtime
from mmjax.data import accounting


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/shapes.py:coca_unicl_prefix")
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--workdir", default="/tmp/mmjax_ckpt_bench")
  parser.add_argument("--local_dir", default="/dev/shm/mmjax_ckpt_bench")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--coordinator", default="127.0.0.1:12399")
  args = parser.parse_args()
  config = cli.load_config(args.config)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    config.mesh.shape = (1, -1, 1)
  if args.process_id == 0:
    for folder in (args.workdir, args.local_dir):
      shutil.rmtree(folder, ignore_errors=True)
  if args.num_processes > 1:
    multihost_utils.sync_global_devices("mmjax_ckpt_bench_clean")
  rt = runtime.build(config)
  times = {"persistent": [], "local": [], "local_write_only": []}
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
      local._manager.wait_until_finished()  # written on local storage
      written = time.perf_counter() - start
      local.replicate()  # sealed, and with several processes copied to the peer
      times["local"].append((held, time.perf_counter() - start))
      times["local_write_only"].append((held, written))
    persistent.close()
    local.close()
  if args.process_id != 0:
    return
  out = {"config": args.config, "processes": args.num_processes,
         "global_state_mib": round(state_mib, 1), "saves": args.saves,
         "cpu": common.cpu_model(), "load": os.getloadavg()[0],
         "workdir": args.workdir, "local_dir": args.local_dir}
  for tier, pairs in times.items():
    out[f"{tier}_blocking_s"] = round(statistics.median(p[0] for p in pairs), 4)
    out[f"{tier}_committed_s"] = round(statistics.median(p[1] for p in pairs), 4)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
