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
