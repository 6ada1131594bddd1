#!/usr/bin/env bash
# One-shot accelerator check: tests on the device, tokens = CPU's, bf16 score error and precision guard, d16 with
# 100 and 1000 classes, d30 with 100 and the digits demo benchmarked, measured bf16 matmul peak, MFU, peak memory,
# launches per forward, host syncs per step, busy share → one JSON report.
#   scripts/device_check.sh [REPORT.json] [--cpu-smoke]      (from the repository root; default $OUT/device_check.json)
# Needs no network: it uses the installed torch and the repository itself (PYTHONPATH), nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-${TMPDIR:-/tmp}/avarc-device-check-cache}"
PY="${PYTHON:-python3}"
"$PY" - <<'PYCHECK' || { echo "device_check: missing Python packages (see above); install them and rerun" >&2; exit 2; }
import importlib, sys
missing = [m for m in ("torch", "typer", "rich", "yaml", "numpy", "PIL", "pytest", "sklearn", "filelock", "huggingface_hub")
           if importlib.util.find_spec(m) is None]
if missing:
    print("missing:", " ".join(missing), file=sys.stderr); sys.exit(1)
PYCHECK
exec timeout "${DEVICE_CHECK_TIMEOUT:-580}" "$PY" scripts/device_check.py "$@"
