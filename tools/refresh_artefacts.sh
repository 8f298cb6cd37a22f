#!/usr/bin/env bash
# Rebuild from scratch the artefacts that notebooks load with common.cached_file(..., committed=True)
# and commit them in helpers/weights/ (ARCHITECTURE.md, "Artefacts": small artefacts may be committed when `make` can
# rebuild them). The committed copies are removed first, every notebook runs on an empty cache, and
# exactly the files they asked for (BOOK_ARTEFACT_LOG) are copied back with their SHA-256 sidecars.
# The book's trained models (helpers.zoo, helpers/weights/models/) are among them.
#
# Usage: tools/refresh_artefacts.sh [PYTHON]   (make refresh-artefacts; about 20 minutes on 2 cores)
set -euo pipefail
python=${1:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
system=$("$python" -c 'from helpers import common; print(common.cache_dir("system"))')
mkdir -p "$tmp/cache"
ln -s "$system" "$tmp/cache/system"       # unpacked Debian data: an install, not an artefact
find helpers/weights -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
export BOOK_CACHE="$tmp/cache" BOOK_ARTEFACT_LOG="$tmp/log" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for nb in nbs/*.ipynb; do
    echo "[refresh-artefacts] $nb"
    "$python" -m jupyter nbconvert --to notebook --execute --stdout "$nb" \
        --ExecutePreprocessor.timeout=3600 >/dev/null
done
sort -u "$tmp/log" | xargs "$python" -m helpers.common commit
du -sh helpers/weights
