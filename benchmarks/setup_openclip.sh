#!/usr/bin/env bash
# Creates the separate venv for open_clip side-by-side work (parity tests, converting
# checkpoints from .pt/.bin, open_clip benchmarks). Idempotent: reruns only check it.
#
#   benchmarks/setup_openclip.sh [VENV]          # default /work/venv-oc
#   HF_HUB_OFFLINE=1 PYTHONPATH=. /work/venv-oc/bin/python -m pytest tests/test_openclip.py
#
# Only torch==2.14.1 + torchvision==0.29.1 work on these machines (the CPU build 2.13.0
# fails with its torchvision); the wheels come from local disk (~5.6 GB venv, about a
# minute). open-clip-torch==3.3.0 is the version the converter's key mapping is tested on.
# `create_model("coca_ViT-B-32", pretrained=None)` needs no network with HF_HUB_OFFLINE=1.
set -euo pipefail
VENV="${1:-/work/venv-oc}"
PACKAGES=(torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0 jax flax optax
          orbax-checkpoint grain tensorflow-datasets ml_collections sentencepiece pillow
          tensorboardX pycocoevalcap absl-py pytest safetensors)

check() {
  "$VENV/bin/python" - <<'PY'
import jax, open_clip, torch, torchvision
assert torch.__version__.startswith("2.14.1"), torch.__version__
assert open_clip.__version__ == "3.3.0", open_clip.__version__
assert jax.__version__.startswith("0.10."), jax.__version__
print(f"open_clip venv ok: torch {torch.__version__}, open_clip {open_clip.__version__}, "
      f"jax {jax.__version__}")
PY
}

if [[ -x "$VENV/bin/python" ]] && check 2>/dev/null; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "${PACKAGES[@]}"
check
