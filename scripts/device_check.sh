#!/usr/bin/env bash
# One-shot accelerator check, 8 minutes on an H100 or an H200 (scripts/device_check.py says what it measures): tokens =
# the CPU goldens, compiled and eager engines, d16 x 100 / x 1000 classes, d30, the demo, MFU against the measured and
# the data-sheet peak, graphs/fallbacks, launches, the Scorer's host syncs, memory, encoder layouts, busy share, the
# engine tests on the device -> one JSON report and PASS/FAIL lines.
#   scripts/device_check.sh [REPORT.json] [--cpu-smoke]      (from the repository root; default $OUT/device_check.json)
# Sections run while DEVICE_CHECK_BUDGET (450 s) lasts; the hard timeout DEVICE_CHECK_TIMEOUT (540 s) only stops a
# section that overran its estimate (the report is rewritten after each one). Give the device command 600 s.
# Needs no network: it uses the installed torch and the repository itself (PYTHONPATH), nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-${TMPDIR:-/tmp}/avarc-device-check-cache}"
PY="${PYTHON:-python3}"
"$PY" - <<'PYCHECK' || { echo "device_check: missing Python packages (see above); install them and rerun" >&2; exit 2; }
import importlib.util, sys
missing = [m for m in ("torch", "typer", "rich", "yaml", "numpy", "PIL", "pytest", "sklearn", "filelock", "huggingface_hub")
           if importlib.util.find_spec(m) is None]
if missing:
    print("missing:", " ".join(missing), file=sys.stderr); sys.exit(1)
PYCHECK
exec timeout "${DEVICE_CHECK_TIMEOUT:-540}" "$PY" scripts/device_check.py "$@"
