#!/usr/bin/env bash
# Create the project's virtual environment and install the pinned packages (pyproject.toml).
# Called by `make setup` only when pyproject.toml or requirements-nodeps.txt changed.
#
# Usage: tools/setup_python.sh PYTHON VENV
set -euo pipefail
python=${1:?usage: setup_python.sh PYTHON VENV}
venv=${2:?usage: setup_python.sh PYTHON VENV}

if ! command -v "$python" >/dev/null 2>&1; then
    echo "[setup-python] ERROR: $python not found. The book needs Python 3.11 (e.g. 'apt-get install python3.11 python3.11-venv'), or run 'make PYTHON=/path/to/python3.11 ...'." >&2
    exit 1
fi
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
    echo "[setup-python] ERROR: $python is Python $version; the pinned torch 2.14.1 / torchvision 0.29.1 set needs Python 3.11. Run 'make PYTHON=python3.11 ...'." >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "[setup-python] creating $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=24" "setuptools>=68" wheel
echo "[setup-python] installing pinned packages (first time: several minutes, ~7 GB with torch)"
"${pip[@]}" install -q -e .
# Packages whose declared dependencies we must not install (see the file's comment).
"${pip[@]}" install -q --no-deps -r requirements-nodeps.txt
echo "[setup-python] OK: $("$venv/bin/python" -c 'import torch, transformers, timm; print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}")')"
