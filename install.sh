#!/usr/bin/env bash
# One command on a fresh machine: a virtual environment in .venv with the runtime and test deps.
# Picks torch for the machine (CPU wheel here, CUDA build where nvidia-smi works); never downloads
# model weights. Safe and fast to re-run: pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

log() { printf '[install] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || log "pip upgrade skipped (offline?)"

if "$PY" -c "import torch" >/dev/null 2>&1; then
  log "torch already installed: $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  log "GPU found (nvidia-smi works): installing the CUDA build of torch"
  "$PY" -m pip install -q "torch>=2.6"
else
  # The CPU build lies on this machine's disk; pip takes it for an exact pin.
  log "no GPU: installing the CPU build torch==$TORCH_VERSION"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi

log "installing zimage-serve and its test dependencies"
"$PY" -m pip install -q -e ".[test]"

# Debian's packages: HAProxy (the balancer of app.replicas > 1, docs/SCALING.md), headless
# Chromium for the browser test (no browser download from a test tool), and a CJK font so Chinese
# prompts render in it.
missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ "${SKIP_BROWSER:-0}" != 1 ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  dpkg -s fonts-wqy-zenhei >/dev/null 2>&1 || missing+=(fonts-wqy-zenhei)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian packages: ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || log "apt-get install failed: the replica and browser tests will be skipped"
  else
    log "missing ${missing[*]} and not root: their tests will be skipped (apt-get install ${missing[*]})"
  fi
fi

mkdir -p logs outputs
log "done. Start: $VENV/bin/zimagectl up   Test: $VENV/bin/python -m pytest"
