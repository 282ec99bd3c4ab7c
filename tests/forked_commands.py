"""Runs many `python -m mmjax.<command> ...` command lines fast: one process imports the
libraries once (jax, flax, TFDS, Grain, Orbax: most of a command's start-up time), then
forks a child per command line that runs the command's module as `__main__` exactly as
`python -m` does (its own flags, its own `errors.run`), with its own working directory,
environment, stdout and stderr. A child never shares a JAX backend with its parent: the
parent imports jax but starts no backend.

  python tests/forked_commands.py [PARALLEL] < cases.json > results.json

Input: a JSON list of {"module": "mmjax.train", "args": [...], "cwd": DIR, "env": {...},
"timeout": seconds}; output: a JSON list of {"returncode", "stdout", "stderr", "seconds"}.
PARALLEL children run at once (default: one per CPU).
"""
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Libraries only: mmjax's command modules define their flags when imported, so each child
# imports its command afresh.
import flax.linen  # noqa: E402,F401
import jax  # noqa: E402,F401
import ml_collections  # noqa: E402,F401
import optax  # noqa: E402,F401
import orbax.checkpoint  # noqa: E402,F401
import tensorflow_datasets  # noqa: E402,F401

import mmjax.runtime  # noqa: E402,F401  (no flags: the shared library code of every command)

try:  # Apache Beam (the `test` extra), imported quietly as mmjax.ingest does
  import mmjax.ingest.beam  # noqa: F401
except ImportError:
  pass


def run_child(case: dict, out_path: str, err_path: str) -> None:
  """In the forked child: never returns."""
  code = 1
  try:
    for fd, path in ((1, out_path), (2, err_path)):
      handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(handle, fd)
      os.close(handle)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    signal.alarm(int(case.get("timeout", 120)))
    os.environ.update(case.get("env", {}))
    if "JAX_NUM_CPU_DEVICES" in case.get("env", {}):  # read by jax at import: set it again
      jax.config.update("jax_num_cpu_devices", int(case["env"]["JAX_NUM_CPU_DEVICES"]))
    os.chdir(case.get("cwd", os.getcwd()))
    sys.argv = [case["module"], *case["args"]]
    try:
      runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      if e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
  except BaseException:  # noqa: BLE001 (what python -m would print)
    traceback.print_exc()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cases(cases: list[dict], parallel: int) -> list[dict]:
  """Forks a child per case, `parallel` at a time; results in the order of `cases`."""
  with tempfile.TemporaryDirectory() as tmp:
    results, running, todo = [None] * len(cases), {}, list(enumerate(cases))
    while todo or running:
      while todo and len(running) < parallel:
        i, case = todo.pop(0)
        paths = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
        pid = os.fork()
        if pid == 0:
          run_child(case, *paths)
        running[pid] = (i, paths, time.time())
      pid, status = os.wait()
      i, (out_path, err_path), start = running.pop(pid)
      with open(out_path, errors="replace") as f_out, open(err_path, errors="replace") as f_err:
        results[i] = {"returncode": os.waitstatus_to_exitcode(status), "stdout": f_out.read(),
                      "stderr": f_err.read(), "seconds": round(time.time() - start, 2)}
    return results


def main() -> None:
  cases = json.load(sys.stdin)
  parallel = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count() or 1
  json.dump(run_cases(cases, parallel), sys.stdout)


if __name__ == "__main__":
  main()
