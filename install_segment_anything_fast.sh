#!/usr/bin/env bash
# Create (or reuse) a virtualenv, install the pinned requirements.txt, then this checkout as the
# sam-fast-serve package (editable: the console commands run the checkout's code). Safe to run again.
# An already installed torch is never uninstalled or replaced: the torch pins are then skipped.
#   VENV=path/to/venv bash install_segment_anything_fast.sh     (default: .venv next to this script)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

java_major() {
  command -v java >/dev/null 2>&1 || { echo 0; return; }
  java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}
if [ "$(java_major)" -lt 11 ]; then
  echo "error: TorchServe needs Java 11 or newer (found: $(java -version 2>&1 | head -n1 || echo none))." >&2
  echo "       On Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  have=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
  echo "keeping the installed torch $have (requirements.txt pins torch==2.14.1)"
  "${PIP[@]}" -r <(grep -vE '^(torch|torchvision)==' requirements.txt)
else
  "${PIP[@]}" -r requirements.txt
fi
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch, segment_anything, sam2, ts, cv2, pycocotools, sam_fast_serve; print('sam-fast-serve', sam_fast_serve.__version__, 'environment ready: torch', torch.__version__)"
