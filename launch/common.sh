# shellcheck shell=bash
# Helpers every launch script sources: usage errors, option values, printing and running
# commands, the GPU process environment. The sourcing script sets LAUNCHER (its name, for
# messages) before sourcing and DRY_RUN (0/1) before calling `run`.
# shellcheck disable=SC2154  # LAUNCHER and DRY_RUN are the sourcing script's

# Overlaps collectives with compute: harmless on one GPU, useful as soon as the mesh has more.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

# die MESSAGE...: one line on stderr, exit status 2 (a usage error).
die() { echo "$LAUNCHER: $*" >&2; exit 2; }

# need OPTION "$@": the option is followed by a non-empty value.
need() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"; }

# q WORD: WORD quoted for a POSIX shell (no quotes when not needed).
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# print_cmd CMD...: the command as a line that can be pasted into a shell.
print_cmd() {
  local out="" a
  for a in "$@"; do out+="$(q "$a") "; done
  echo "${out% }"
}

# run CMD...: print it (dry run) or print it to stderr and execute it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then print_cmd "$@"; else echo "+ $(print_cmd "$@")" >&2; "$@"; fi
}

# gpu_env_vars MEM_FRACTION ADD_XLA_FLAGS: sets ENV_VARS to a GPU process's environment:
# XLA_PYTHON_CLIENT_MEM_FRACTION, and the user's XLA_FLAGS (kept) with GPU_XLA_FLAGS
# appended when ADD_XLA_FLAGS is 1.
gpu_env_vars() {
  ENV_VARS=("XLA_PYTHON_CLIENT_MEM_FRACTION=$1")
  if [[ "$2" == 1 ]]; then
    ENV_VARS+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }$GPU_XLA_FLAGS")
  elif [[ -n "${XLA_FLAGS:-}" ]]; then
    ENV_VARS+=("XLA_FLAGS=$XLA_FLAGS")
  fi
}

# Exit statuses of mmjax.train (python -m mmjax.train --help): 0 done, 1 an expected failure
# (non-finite loss past its guard, too much bad data), 2 a usage error, 42 preempted (the
# step reached is checkpointed), 43 a hang (mmjax.watchdog), 130 a second Ctrl-C.
# retryable STATUS: true for a failure a restart can fix: preemption (42), a hang (43), a
# death by signal (128+N: kill -9 137, the coordination service's abort 134 when a peer
# host died, SIGTERM 143), but not a person's Ctrl-C (130). A bug (1) or a config error (2)
# would fail the same way again.
retryable() {
  case "$1" in
    42|43) return 0 ;;
    130) return 1 ;;
    *) (( $1 > 128 && $1 < 160 )) ;;
  esac
}

# with_restarts MAX BACKOFF_S CMD...: runs CMD until it exits 0, restarting it up to MAX
# times after a retryable status, waiting BACKOFF_S, 2*BACKOFF_S, ... (at most 600 s) first.
# Each start resumes from the newest checkpoint (the trainer's own resume). Returns CMD's
# last status.
with_restarts() {
  local max="$1" backoff="$2" attempt=0 status wait_s
  shift 2
  while true; do
    status=0
    "$@" || status=$?
    if [[ "$status" == 0 ]]; then return 0; fi
    if ! retryable "$status"; then
      echo "$LAUNCHER: exit status $status is not retried (1: a failure of the run, 2: a" \
           "usage error, 130: interrupted); see the log" >&2
      return "$status"
    fi
    if ((attempt >= max)); then
      echo "$LAUNCHER: exit status $status after $max restarts: giving up" >&2
      return "$status"
    fi
    attempt=$((attempt + 1))
    wait_s=$((backoff << (attempt - 1)))
    ((wait_s <= 600)) || wait_s=600
    echo "$LAUNCHER: exit status $status ($(describe_status "$status")); restart" \
         "$attempt/$max in $wait_s s, resuming from the newest checkpoint" >&2
    sleep "$wait_s"
  done
}

describe_status() {
  case "$1" in
    42) echo "preempted" ;;
    43) echo "hang" ;;
    *) echo "killed by signal $(($1 - 128))" ;;
  esac
}
