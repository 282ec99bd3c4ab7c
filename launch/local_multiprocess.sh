#!/usr/bin/env bash
# Run N mmjax.train processes on localhost (CPU) as one multi-process JAX job.
#
# Exercises the multi-host code path (jax.distributed.initialize, process-local
# data loading, cross-process collectives over gloo) without any accelerator.
# Each process gets K fake CPU devices, so the global mesh has N*K devices.
set -euo pipefail
LAUNCHER=local_multiprocess.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [options] [-- EXTRA_TRAIN_ARGS...]

Starts N processes of `python -m mmjax.train` on this machine, each with
  --coordinator_address 127.0.0.1:PORT --num_processes N --process_id i
waits for all of them, and as soon as one fails kills the others (SIGKILL after 10 s,
frozen ones included) and restarts them all after a preemption (exit 42), a hang (43) or
a death by signal, up to --max-restarts times (each start resumes from the newest
checkpoint); other failures end it with that status. Process i logs to
WORKDIR/logs/process_i.log (appended to by each start).

Options (environment variable in brackets):
  -n, --num_processes N      number of processes                 [NUM_PROCESSES, default 2]
  --devices_per_process K    CPU devices per process (JAX_NUM_CPU_DEVICES)
                                                                 [DEVICES_PER_PROCESS, default 2]
  --config SPEC              config file[:arg]                   [CONFIG, default
                             configs/shapes.py:coca_unicl_prefix,tiny: seconds per step on a CPU]
  --workdir DIR              workdir (logs go to DIR/logs)       [WORKDIR, default workdir/local_multiprocess]
  --port PORT                coordinator port, 0 = pick a free one [PORT, default 0]
  --module MOD               python module to run                [MODULE, default mmjax.train]
  --python BIN               python interpreter                  [PYTHON, default python3]
  --max-restarts N           restarts of the whole job, 0 = none [MAX_RESTARTS, default 0]
  --restart-backoff S        seconds before the first restart, doubling [RESTART_BACKOFF, default 5]
  --dry-run                  print the commands, run nothing
  -h, --help                 show this help

Relative paths (--config, --workdir) are relative to the repository root.
Everything after `--` is passed through to every process unchanged, e.g.
  launch/local_multiprocess.sh -n 4 --devices_per_process 2 --workdir /tmp/mp -- --config.total_steps=20
Use the python of your venv (--python .venv/bin/python, or activate it first). The
processes inherit the environment and use the config's compilation_cache_dir, but JAX
writes cache entries only from process 0 and, on CPU, the other processes' cache keys
differ: they compile every program themselves (minutes on a small CPU).
EOF
}

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
CONFIG="${CONFIG:-configs/shapes.py:coca_unicl_prefix,tiny}"
WORKDIR="${WORKDIR:-workdir/local_multiprocess}"
PORT="${PORT:-0}"
MODULE="${MODULE:-mmjax.train}"
PYTHON="${PYTHON:-python3}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RESTART_BACKOFF="${RESTART_BACKOFF:-5}"
DRY_RUN=0
EXTRA_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num_processes|--num-processes) need "$@"; NUM_PROCESSES="$2"; shift 2 ;;
    --devices_per_process|--devices-per-process) need "$@"; DEVICES_PER_PROCESS="$2"; shift 2 ;;
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --port) need "$@"; PORT="$2"; shift 2 ;;
    --max-restarts|--max_restarts) need "$@"; MAX_RESTARTS="$2"; shift 2 ;;
    --restart-backoff|--restart_backoff) need "$@"; RESTART_BACKOFF="$2"; shift 2 ;;
    --module) need "$@"; MODULE="$2"; shift 2 ;;
    --python) need "$@"; PYTHON="$2"; shift 2 ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$NUM_PROCESSES'"
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be an integer"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number"
[[ "$RESTART_BACKOFF" =~ ^[0-9]+$ ]] || die "--restart-backoff must be whole seconds"

pick_free_port() {
  "$PYTHON" - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

AUTO_PORT=0
if [[ "$PORT" == 0 ]]; then
  AUTO_PORT=1
  if [[ "$DRY_RUN" == 1 ]] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    PORT=12355  # placeholder; the real run picks a free port
  else
    PORT="$(pick_free_port)"
  fi
fi

# Relative --config/--workdir paths are relative to the repo root.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG_DIR="$WORKDIR/logs"
ENV_VARS=(
  JAX_PLATFORMS=cpu
  "JAX_NUM_CPU_DEVICES=$DEVICES_PER_PROCESS"
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
)

build_cmd() {  # $1 = process id; sets CMD
  CMD=("$PYTHON" -m "$MODULE" --config "$CONFIG" --workdir "$WORKDIR"
       --coordinator_address "127.0.0.1:$PORT" --num_processes "$NUM_PROCESSES"
       --process_id "$1" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
}

if [[ "$DRY_RUN" == 1 ]]; then
  echo "# $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator 127.0.0.1:$PORT"
  print_cmd mkdir -p "$LOG_DIR"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    build_cmd "$i"
    echo "$(print_cmd env "${ENV_VARS[@]}" "${CMD[@]}") > $(print_cmd "$LOG_DIR/process_$i.log") 2>&1 &"
  done
  echo "wait  # any failure kills the remaining processes"
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()

cleanup() {  # TERM (a preemption: they checkpoint), KILL what is left after 10 s
  local pid t
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill -TERM "$pid" 2>/dev/null || true
    kill -CONT "$pid" 2>/dev/null || true  # a frozen (SIGSTOPped) process gets it too
  done
  for ((t = 0; t < 20; t++)); do
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do
      kill -0 "$pid" 2>/dev/null && break
      pid=""
    done
    [[ -z "${pid:-}" ]] && break
    sleep 0.5
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap cleanup EXIT
trap 'echo "local_multiprocess.sh: interrupted" >&2; exit 130' INT TERM

# prefer_retryable_status: replaces JOB_RC by the retryable status of another process that
# has also exited: a peer's death (kill -9) often makes the others fail at once with an
# error of their own (1), and what happened to the job is the death.
prefer_retryable_status() {
  local j rc_j
  for ((j = 0; j < NUM_PROCESSES; j++)); do
    [[ "${ALIVE[j]}" == 1 ]] || continue
    kill -0 "${PIDS[j]}" 2>/dev/null && continue
    rc_j=0
    wait "${PIDS[j]}" || rc_j=$?
    ALIVE[j]=0
    if retryable "$rc_j"; then
      echo "local_multiprocess.sh: process $j exited with status $rc_j too" >&2
      JOB_RC="$rc_j"
      return
    fi
  done
}

run_job() {  # starts every process; returns 0, or the status of the first that failed
local i rc remaining
if [[ "$AUTO_PORT" == 1 && "${STARTED:-0}" == 1 ]]; then PORT="$(pick_free_port)"; fi
STARTED=1
echo "Starting $NUM_PROCESSES processes (coordinator 127.0.0.1:$PORT), logs in $LOG_DIR/"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_cmd "$i"
  env "${ENV_VARS[@]}" "${CMD[@]}" >>"$LOG_DIR/process_$i.log" 2>&1 &
  PIDS+=("$!")
  echo "  process $i: pid $! -> $LOG_DIR/process_$i.log"
done

# Poll instead of `wait -n -p` so this also works with bash < 5.1 (macOS).
declare -a ALIVE
for ((i = 0; i < NUM_PROCESSES; i++)); do ALIVE[i]=1; done
remaining=$NUM_PROCESSES
while ((remaining > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ "${ALIVE[i]}" == 1 ]] || continue
    kill -0 "${PIDS[i]}" 2>/dev/null && continue
    rc=0
    wait "${PIDS[i]}" || rc=$?
    ALIVE[i]=0
    remaining=$((remaining - 1))
    if [[ "$rc" != 0 ]]; then
      echo "local_multiprocess.sh: process $i (pid ${PIDS[i]}) exited with status $rc;" \
           "killing the others. Last lines of $LOG_DIR/process_$i.log:" >&2
      tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
      retryable "$rc" || { JOB_RC="$rc"; prefer_retryable_status; rc="$JOB_RC"; }
      cleanup
      return "$rc"
    fi
  done
  ((remaining > 0)) && sleep 0.5
done
PIDS=()
}

status=0
with_restarts "$MAX_RESTARTS" "$RESTART_BACKOFF" run_job || status=$?
[[ "$status" == 0 ]] || exit "$status"
echo "All $NUM_PROCESSES processes finished successfully."
