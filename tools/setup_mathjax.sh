#!/usr/bin/env bash
# MathJax 3 served from the book itself so that math renders with no network (DESIGN §5).
# Fetched from the npm registry by name; only the es5/ bundle is kept. Idempotent.
#
# Usage: tools/setup_mathjax.sh DEST_DIR   (DEST_DIR/tex-chtml.js is what _config.yml points at)
set -euo pipefail
dest=${1:?usage: setup_mathjax.sh DEST_DIR}
version=3.2.2

if [ -f "$dest/tex-chtml.js" ] && [ "$(cat "$dest/.version" 2>/dev/null)" = "$version" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "[setup-mathjax] ERROR: npm is needed to fetch MathJax $version (apt-get install npm)," \
         "or unpack the npm package mathjax@$version's es5/ folder into $dest yourself." >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[setup-mathjax] npm pack mathjax@$version"
(cd "$tmp" && npm pack --silent "mathjax@$version" >/dev/null)
tar -xzf "$tmp"/mathjax-"$version".tgz -C "$tmp"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
cp -r "$tmp/package/es5" "$dest"
echo "$version" > "$dest/.version"
echo "[setup-mathjax] MathJax $version installed in $dest"
