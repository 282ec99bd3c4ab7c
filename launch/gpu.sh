#!/usr/bin/env bash
# Train (or evaluate) mmjax on a single NVIDIA GPU.
set -euo pipefail
LAUNCHER=gpu.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [options] [-- EXTRA_ARGS...]

Runs `python -m mmjax.train --config CONFIG --workdir WORKDIR EXTRA_ARGS...`
on one GPU. Rerunning with the same WORKDIR resumes from WORKDIR/checkpoints.

Options (environment variable in brackets):
  --config SPEC        config file[:arg]                  [CONFIG, default configs/shapes.py:
                       needs no downloaded data; configs/coca.py:* needs its datasets]
  --workdir DIR        local dir or gs://bucket/path      [WORKDIR, default workdir/gpu]
  --gpu ID             which GPU to use (CUDA_VISIBLE_DEVICES) [GPU, default: leave unset]
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION     [MEM_FRACTION, default 0.90]
  --no-xla-flags       do not add the default XLA_FLAGS (user XLA_FLAGS are always kept)
  --evaluate           run mmjax.evaluate instead of mmjax.train (restores params only)
  --step N             with --evaluate: checkpoint step to evaluate [default: latest]
  --install            first run: pip install -e '.[gcs]' and "jax[cudaXX]"
  --cuda 12|13         CUDA major version for --install    [JAX_CUDA, default 12]
                       (jax[cuda13] needs an NVIDIA driver >= 580)
  --python BIN         python interpreter                 [PYTHON, default python3]
  --dry-run            print what would run, run nothing
  -h, --help           show this help

Relative paths (--config, --workdir) are relative to the repository root.
Default XLA_FLAGS added: --xla_gpu_enable_latency_hiding_scheduler=true
(overlaps collectives with compute; harmless on one GPU, useful as soon as the
mesh has more devices). Extra XLA flags: export XLA_FLAGS="..." beforehand.

Examples:
  launch/gpu.sh --install --python .venv/bin/python --workdir /tmp/shapes    # first time
  launch/gpu.sh --config configs/coca.py:base --workdir /data/runs/coca_debug -- \
      --config.batch_size=64 --config.grad_accum_steps=4 --config.total_steps=20
EOF
}

CONFIG="${CONFIG:-configs/shapes.py}"
WORKDIR="${WORKDIR:-workdir/gpu}"
GPU="${GPU:-}"
MEM_FRACTION="${MEM_FRACTION:-0.90}"
JAX_CUDA="${JAX_CUDA:-12}"
PYTHON="${PYTHON:-python3}"
USE_XLA_FLAGS=1
MODULE=mmjax.train
STEP=""
INSTALL=0
DRY_RUN=0
EXTRA_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --gpu) need "$@"; GPU="$2"; shift 2 ;;
    --mem-fraction|--mem_fraction) need "$@"; MEM_FRACTION="$2"; shift 2 ;;
    --no-xla-flags) USE_XLA_FLAGS=0; shift ;;
    --evaluate) MODULE=mmjax.evaluate; shift ;;
    --step) need "$@"; STEP="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --cuda) need "$@"; JAX_CUDA="$2"; shift 2 ;;
    --python) need "$@"; PYTHON="$2"; shift 2 ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ "$JAX_CUDA" == 12 || "$JAX_CUDA" == 13 ]] || die "--cuda must be 12 or 13"
[[ -z "$STEP" || "$MODULE" == mmjax.evaluate ]] || die "--step only makes sense with --evaluate"

# Relative --config/--workdir paths and `pip install -e .` are relative to the repo root.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "$INSTALL" == 1 ]]; then
  run "$PYTHON" -m pip install -U pip
  run "$PYTHON" -m pip install -e ".[gcs]" "jax[cuda${JAX_CUDA}]"
fi

gpu_env_vars "$MEM_FRACTION" "$USE_XLA_FLAGS"
[[ -n "$GPU" ]] && ENV_VARS+=("CUDA_VISIBLE_DEVICES=$GPU")

CMD=("$PYTHON" -m "$MODULE" --config "$CONFIG" --workdir "$WORKDIR")
[[ -n "$STEP" ]] && CMD+=(--step "$STEP")
CMD+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})

if [[ "$DRY_RUN" == 0 && "$WORKDIR" != gs://* ]]; then
  mkdir -p "$WORKDIR"
fi
run env "${ENV_VARS[@]}" "${CMD[@]}"
