#!/usr/bin/env bash
# Create / use / delete a Cloud TPU VM (single host or pod slice) for mmjax.
set -euo pipefail
LAUNCHER=tpu_vm.sh
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [global options] COMMAND [command options] [-- ARGS...]

Commands:
  create   create the TPU VM (or a queued resource with --queued)
  ssh      ssh into one worker (--worker, default 0); ARGS go to gcloud ssh
  run      on ALL workers: install mmjax (git clone or --copy-local), then
           python -m mmjax.train --config CONFIG --workdir WORKDIR ARGS...
           with output tee'd to ~/mmjax-logs/train-<hostname>.log on each worker;
           each worker restarts its process (resuming from the newest checkpoint)
           after a preemption (exit 42), a hang (43) or a death by signal, up to
           --max-restarts times; a failure of the run (1) or a usage error (2) is
           not retried
  logs     copy ~/mmjax-logs from all workers to LOG_DIR (or --tail N: print
           the last N lines of every worker's log)
  delete   delete the TPU VM (or the queued resource)

With --dry-run and no COMMAND, prints the whole create / run / logs sequence.

Options (environment variable in brackets; all have placeholder defaults):
  --dry-run               print the commands instead of running them
  --name NAME             TPU VM name               [TPU_NAME, default mmjax-tpu]
  --zone ZONE             zone                      [ZONE, default us-central2-b]
  --project PROJECT       GCP project               [PROJECT, default: gcloud config]
  --accelerator-type T    e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8
                                                    [ACCELERATOR_TYPE, default v4-32]
  --version V             TPU runtime/software version [TPU_VERSION, default by
                          generation: v2/v3/v4 tpu-ubuntu2204-base,
                          v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                          v6e v2-alpha-tpuv6e]
  --spot                  Spot capacity (create; queued resources too)
  --preemptible           legacy preemptible VM (with --queued: --best-effort)
  --queued                use `gcloud compute tpus queued-resources` (create waits
                          until ACTIVE; delete removes the queued resource)
  --qr-id ID              queued resource id        [QR_ID, default NAME-qr]
  --num-slices N          multislice (needs --queued): N slices of the accelerator type
                          joined over the data-centre network, named NAME-0 ... NAME-<N-1>;
                          run/logs act on every slice (run needs --detach), ssh on
                          --slice [NUM_SLICES, default 1]
  --slice I               ssh: which slice of a multislice job [default 0]
  --config SPEC           config file[:arg]         [CONFIG, default configs/coca.py:base
                          with the accelerator's mesh preset if there is one:
                          v4-32 -> configs/coca.py:base,v4_32, v5p-128 -> ...,v5p_128]
  --workdir DIR           gs:// workdir shared by all workers
                                                    [WORKDIR, default gs://YOUR_BUCKET/mmjax/NAME]
  --repo URL              git repo to clone on the workers
                                                    [REPO_URL, default https://github.com/YOUR_ORG/mmjax.git]
  --ref REF               branch or tag to check out [REPO_REF, default main]
  --copy-local            instead of cloning, scp `git archive HEAD` of this checkout
                          (committed files only)
  --no-install            skip the install step (code and venv already on the workers)
  --python-version X.Y    python for the worker venv (made with uv) [PYTHON_VERSION, default 3.11]
  --env KEY=VALUE         extra environment for training (repeatable)
  --detach                run: start training with nohup and return immediately
  --max-restarts N        run: restarts per worker, 0 = none [MAX_RESTARTS, default 3]
  --restart-backoff S     run: seconds before the first restart, doubling
                                                    [RESTART_BACKOFF, default 30]
  --worker W              ssh: worker index or "all" [WORKER, default 0]
  --log-dir DIR           logs: local destination  [LOG_DIR, default tpu_logs/NAME]
  --tail N                logs: print the last N lines on each worker instead of copying
  -h, --help              show this help

Examples:
  launch/tpu_vm.sh --name my-v4 --accelerator-type v4-32 --spot create
  launch/tpu_vm.sh --name my-v4 --workdir gs://my-bucket/coca run -- --config.total_steps=1000
  launch/tpu_vm.sh --name my-v4 logs --tail 50
  launch/tpu_vm.sh --name my-v4 delete
  launch/tpu_vm.sh --name coca-2x --accelerator-type v5p-128 --queued --num-slices 2 create
  launch/tpu_vm.sh --name coca-2x --accelerator-type v5p-128 --queued --num-slices 2 \
      --workdir gs://my-bucket/coca --detach run
EOF
}

DRY_RUN=0
COMMAND=""
TPU_NAME="${TPU_NAME:-mmjax-tpu}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
TPU_VERSION="${TPU_VERSION:-}"
SPOT=0
PREEMPTIBLE=0
QUEUED=0
QR_ID="${QR_ID:-}"
NUM_SLICES="${NUM_SLICES:-1}"
SLICE=0
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
REPO_URL="${REPO_URL:-https://github.com/YOUR_ORG/mmjax.git}"
REPO_REF="${REPO_REF:-main}"
COPY_LOCAL=0
INSTALL=1
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
TRAIN_ENV=()
DETACH=0
MAX_RESTARTS="${MAX_RESTARTS:-3}"
RESTART_BACKOFF="${RESTART_BACKOFF:-30}"
WORKER="${WORKER:-0}"
LOG_DIR="${LOG_DIR:-}"
TAIL=""
EXTRA_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    --name) need "$@"; TPU_NAME="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator-type|--accelerator_type) need "$@"; ACCELERATOR_TYPE="$2"; shift 2 ;;
    --version) need "$@"; TPU_VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --qr-id) need "$@"; QR_ID="$2"; shift 2 ;;
    --num-slices|--num_slices) need "$@"; NUM_SLICES="$2"; shift 2 ;;
    --slice) need "$@"; SLICE="$2"; shift 2 ;;
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --repo) need "$@"; REPO_URL="$2"; shift 2 ;;
    --ref) need "$@"; REPO_REF="$2"; shift 2 ;;
    --copy-local) COPY_LOCAL=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --python-version) need "$@"; PYTHON_VERSION="$2"; shift 2 ;;
    --env) need "$@"; [[ "$2" == *=* ]] || die "--env needs KEY=VALUE"; TRAIN_ENV+=("$2"); shift 2 ;;
    --detach) DETACH=1; shift ;;
    --max-restarts|--max_restarts) need "$@"; MAX_RESTARTS="$2"; shift 2 ;;
    --restart-backoff|--restart_backoff) need "$@"; RESTART_BACKOFF="$2"; shift 2 ;;
    --worker) need "$@"; WORKER="$2"; shift 2 ;;
    --log-dir) need "$@"; LOG_DIR="$2"; shift 2 ;;
    --tail) need "$@"; TAIL="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    create|ssh|run|logs|delete)
      [[ -z "$COMMAND" ]] || die "only one command allowed (got '$COMMAND' and '$1')"
      COMMAND="$1"; shift ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ "$SPOT" == 1 && "$PREEMPTIBLE" == 1 ]] && die "--spot and --preemptible are exclusive"
[[ -z "$TAIL" || "$TAIL" =~ ^[0-9]+$ ]] || die "--tail needs a number"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices needs a positive number"
[[ "$SLICE" =~ ^[0-9]+$ && "$SLICE" -lt "$NUM_SLICES" ]] || die "--slice must be below --num-slices"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number, got '$MAX_RESTARTS'"
[[ "$RESTART_BACKOFF" =~ ^[0-9]+$ ]] || die "--restart-backoff must be whole seconds, got '$RESTART_BACKOFF'"
if [[ "$NUM_SLICES" -gt 1 ]]; then
  [[ "$QUEUED" == 1 ]] || die "--num-slices needs --queued (multislice is a queued resource)"
  [[ "$COMMAND" != run || "$DETACH" == 1 ]] || die "a multislice run needs --detach" \
    "(every slice must start; an attached run would wait on the first)"
fi
# The TPU VM of each slice: NAME itself, or NAME-0 ... NAME-<N-1> (queued --node-prefix).
NODES=("$TPU_NAME")
if [[ "$NUM_SLICES" -gt 1 ]]; then
  NODES=()
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("${TPU_NAME}-$i"); done
fi
QR_ID="${QR_ID:-${TPU_NAME}-qr}"
if [[ -z "$CONFIG" ]]; then
  case "$ACCELERATOR_TYPE" in
    v4-32) CONFIG=configs/coca.py:base,v4_32 ;;
    v5p-128) CONFIG=configs/coca.py:base,v5p_128 ;;
    *) CONFIG=configs/coca.py:base ;;
  esac
fi
WORKDIR="${WORKDIR:-gs://YOUR_BUCKET/mmjax/${TPU_NAME}}"
LOG_DIR="${LOG_DIR:-tpu_logs/${TPU_NAME}}"
if [[ -z "$TPU_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) TPU_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) TPU_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) TPU_VERSION=v2-alpha-tpuv6e ;;
    *) TPU_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_vm.sh: warning: WORKDIR '$WORKDIR' is not gs://; on a pod slice every" \
       "worker must see the same checkpoint directory." >&2
fi

GC=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && GC+=(--project "$PROJECT")

cmd_create() {
  if [[ "$QUEUED" == 1 ]]; then
    local cmd=(gcloud compute tpus queued-resources create "$QR_ID")
    if [[ "$NUM_SLICES" -gt 1 ]]; then
      cmd+=(--node-count "$NUM_SLICES" --node-prefix "$TPU_NAME")
    else
      cmd+=(--node-id "$TPU_NAME")
    fi
    cmd+=("${GC[@]}" --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$TPU_VERSION")
    [[ "$SPOT" == 1 ]] && cmd+=(--spot)
    [[ "$PREEMPTIBLE" == 1 ]] && cmd+=(--best-effort)
    run "${cmd[@]}"
    local describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${GC[@]}"
                    --format='value(state.state)')
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "# then poll until the queued resource is ACTIVE:"
      print_cmd "${describe[@]}"
      return
    fi
    local state=""
    while [[ "$state" != ACTIVE ]]; do
      state="$("${describe[@]}")"
      echo "queued resource $QR_ID: $state" >&2
      case "$state" in
        FAILED|SUSPENDED) die "queued resource $QR_ID is $state" ;;
        ACTIVE) ;;
        *) sleep 30 ;;
      esac
    done
  else
    local cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GC[@]}"
               --accelerator-type "$ACCELERATOR_TYPE" --version "$TPU_VERSION")
    [[ "$SPOT" == 1 ]] && cmd+=(--spot)
    [[ "$PREEMPTIBLE" == 1 ]] && cmd+=(--preemptible)
    run "${cmd[@]}"
  fi
}

cmd_ssh() {
  run gcloud compute tpus tpu-vm ssh "${NODES[$SLICE]}" "${GC[@]}" --worker="$WORKER" \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
}

# The script every worker runs (bash, as the login user).
remote_script() {
  local train=("\$HOME/mmjax-venv/bin/python" -m mmjax.train --config "$CONFIG" --workdir "$WORKDIR"
               ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  local train_str="" a
  for a in "${train[@]}"; do
    if [[ "$a" == "\$HOME"* ]]; then train_str+="$a "; else train_str+="$(q "$a") "; fi
  done
  train_str="${train_str% }"
  echo "set -euo pipefail"
  if [[ "$INSTALL" == 1 ]]; then
    if [[ "$COPY_LOCAL" == 1 ]]; then
      echo "mkdir -p \$HOME/mmjax && tar -xzf \$HOME/mmjax-src.tar.gz -C \$HOME/mmjax"
    else
      echo "if [ -d \$HOME/mmjax/.git ]; then git -C \$HOME/mmjax fetch -q --depth 1 origin $(q "$REPO_REF") && git -C \$HOME/mmjax checkout -q FETCH_HEAD;"
      echo "else git clone -q --depth 1 --branch $(q "$REPO_REF") $(q "$REPO_URL") \$HOME/mmjax; fi"
    fi
    # TPU VM images ship python3.10; mmjax needs >= 3.11, so make the venv with uv.
    echo "export PATH=\$HOME/.local/bin:\$PATH"
    echo "command -v uv >/dev/null || python3 -m pip install -q --user -U uv"
    echo "[ -x \$HOME/mmjax-venv/bin/python ] || uv venv -q --python $(q "$PYTHON_VERSION") \$HOME/mmjax-venv"
    echo "cd \$HOME/mmjax && uv pip install -q --python \$HOME/mmjax-venv/bin/python -e \".[gcs]\" \"jax[tpu]\""
  fi
  echo "cd \$HOME/mmjax"
  echo "export JAX_PLATFORMS=tpu,cpu"
  for a in ${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"}; do
    echo "export ${a%%=*}=$(q "${a#*=}")"
  done
  echo "mkdir -p \$HOME/mmjax-logs && LOG=\$HOME/mmjax-logs/train-\$(hostname).log"
  # The worker's restart loop (launch/common.sh's with_restarts) as a script of its own, so
  # that nohup can run it.
  echo "cat > \$HOME/mmjax-logs/train.sh <<'MMJAX_EOF'"
  echo "LAUNCHER=\"mmjax worker \$(hostname)\""
  declare -f retryable with_restarts describe_status
  echo "with_restarts $(q "$MAX_RESTARTS") $(q "$RESTART_BACKOFF") $train_str"
  echo "MMJAX_EOF"
  if [[ "$DETACH" == 1 ]]; then
    echo "nohup bash \$HOME/mmjax-logs/train.sh >\"\$LOG\" 2>&1 </dev/null &"
    echo "echo \"\$(hostname): started pid \$!, log \$LOG\""
  else
    echo "bash \$HOME/mmjax-logs/train.sh 2>&1 | tee -a \"\$LOG\""
  fi
}

cmd_run() {
  local node tarball="${TMPDIR:-/tmp}/mmjax-src-${TPU_NAME}.tar.gz"
  if [[ "$INSTALL" == 1 && "$COPY_LOCAL" == 1 ]]; then
    run git -C "$(dirname "${BASH_SOURCE[0]}")/.." archive --format=tar.gz -o "$tarball" HEAD
  fi
  # Multislice: every slice runs the same command; JAX joins them (MEGASCALE_* set by the
  # queued resource) and mmjax puts the data axis over the slices (mesh.dcn_shape).
  for node in "${NODES[@]}"; do
    if [[ "$INSTALL" == 1 && "$COPY_LOCAL" == 1 ]]; then
      run gcloud compute tpus tpu-vm scp "$tarball" "$node:mmjax-src.tar.gz" "${GC[@]}" --worker=all
    fi
    run gcloud compute tpus tpu-vm ssh "$node" "${GC[@]}" --worker=all --command "$(remote_script)"
  done
}

cmd_logs() {
  local node
  for node in "${NODES[@]}"; do
    if [[ -n "$TAIL" ]]; then
      run gcloud compute tpus tpu-vm ssh "$node" "${GC[@]}" --worker=all \
        --command "tail -n $TAIL \$HOME/mmjax-logs/*.log"
    else
      run mkdir -p "$LOG_DIR"
      run gcloud compute tpus tpu-vm scp --recurse "$node:mmjax-logs" "$LOG_DIR" "${GC[@]}" --worker=all
    fi
  done
}

cmd_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QR_ID" "${GC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GC[@]}" --quiet
  fi
}

if [[ -z "$COMMAND" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# 1. create"; cmd_create
    echo "# 2. run (install + train on all workers)"; cmd_run
    echo "# 3. logs"; cmd_logs
    echo "# 4. when done: launch/tpu_vm.sh delete"
    exit 0
  fi
  usage >&2
  die "missing COMMAND (create | ssh | run | logs | delete)"
fi

"cmd_$COMMAND"
