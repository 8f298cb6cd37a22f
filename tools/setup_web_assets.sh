#!/usr/bin/env bash
# The book's JavaScript, served from the book itself so that pages work with no network (ARCHITECTURE.md, "Measured decisions"):
#   DEST/mathjax/  MathJax 3 (npm mathjax, its es5/ bundle): _config.yml's mathjax_path
#   DEST/widgets/  ipywidgets' HTML manager (npm @jupyter-widgets/html-manager, dist/embed.js and the
#                  fonts it loads next to itself): renders the widget state stored in a page
# Fetched from the npm registry by package name. Idempotent: a folder whose .version matches is kept.
#
# Usage: tools/setup_web_assets.sh DEST_DIR
set -euo pipefail
dest=${1:?usage: setup_web_assets.sh DEST_DIR}

# install NAME VERSION SUBFOLDER-OF-PACKAGE TARGET
install() {
    local name=$1 version=$2 from=$3 target=$dest/$4
    if [ -d "$target" ] && [ "$(cat "$target/.version" 2>/dev/null)" = "$name@$version" ]; then
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "[setup-web-assets] ERROR: npm is needed to fetch $name@$version (apt-get install npm)," \
             "or unpack that npm package's $from/ folder into $target yourself." >&2
        exit 1
    fi
    local tmp
    tmp=$(mktemp -d)
    echo "[setup-web-assets] npm pack $name@$version"
    (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    rm -rf "$target"
    mkdir -p "$(dirname "$target")"
    cp -r "$tmp/package/$from" "$target"
    rm -f "$target"/*.map "$target"/*amd.js   # the AMD builds need RequireJS; embed.js does not
    echo "$name@$version" > "$target/.version"
    rm -rf "$tmp"
    echo "[setup-web-assets] $name@$version installed in $target"
}

install mathjax 3.2.2 es5 mathjax
install @jupyter-widgets/html-manager 1.0.15 dist widgets
