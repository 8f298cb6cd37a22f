#!/usr/bin/env bash
# System packages and data for the book (ARCHITECTURE.md, "Offline assets"), installed from Debian's archive by name.
#   dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist   (apt-get install)
#   wordnet-base           -> /usr/share/wordnet                  (apt-get install)
#   r-cran-janeaustenr     -> $CACHE/system/janeaustenr           (apt-get download + dpkg-deb -x: no R needed)
#   npm                    -> /usr/bin/npm                         (fetches the book's JavaScript; kept if present)
#   chromium               -> /usr/bin/chromium                    (optional: the offline browser test)
# Idempotent: does nothing when everything is present. Never fails with a bare traceback: when a
# package cannot be installed (not root, not Debian) it says so and tries the fallback download,
# which only works online.
#
# Usage: tools/setup_system.sh CACHE_DIR PYTHON
set -uo pipefail

cache=${1:?usage: setup_system.sh CACHE_DIR PYTHON}
python=${2:?usage: setup_system.sh CACHE_DIR PYTHON}
status=0

say() { printf '[setup-system] %s\n' "$*"; }
warn() { printf '[setup-system] WARNING: %s\n' "$*" >&2; }

can_apt() { command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=0
apt_refresh_once() {
    # apt-cache needs the package lists; fetch them once, only when a package is not known yet.
    if [ "$apt_updated" = 0 ] && ! apt-cache show "$1" >/dev/null 2>&1; then
        if is_root; then
            say "apt-get update (package lists are missing or stale)"
            apt-get update -qq || warn "apt-get update failed"
        fi
        apt_updated=1
    fi
}

install_deb() {  # install_deb PACKAGE MARKER_FILE
    local pkg=$1 marker=$2
    if [ -e "$marker" ]; then
        return 0
    fi
    if can_apt && is_root; then
        apt_refresh_once "$pkg"
        say "apt-get install $pkg"
        if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null; then
            return 0
        fi
        warn "apt-get install $pkg failed"
    elif can_apt; then
        warn "$pkg is not installed and installing it needs root: run 'sudo apt-get install $pkg'"
    else
        warn "$pkg is a Debian package and this system has no apt-get"
    fi
    return 1
}

# --- Fashion-MNIST ---------------------------------------------------------------------------
if ! install_deb dataset-fashion-mnist /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz; then
    say "falling back to the official Fashion-MNIST download (needs the network)"
    if ! BOOK_ALLOW_DOWNLOAD=1 "$python" -c "from helpers import assets; assets.fashion_mnist('train'); assets.fashion_mnist('test')"; then
        warn "Fashion-MNIST is unavailable: install the Debian package dataset-fashion-mnist, or go online and rerun 'make setup'"
        status=1
    fi
fi

# --- WordNet 3.0 -----------------------------------------------------------------------------
if ! install_deb wordnet-base /usr/share/wordnet/data.noun; then
    say "falling back to NLTK's WordNet download (needs the network)"
    if ! "$python" -c "import nltk, sys; sys.exit(0 if nltk.download('wordnet', quiet=True) else 1)"; then
        warn "WordNet is unavailable: install the Debian package wordnet-base, or go online and rerun 'make setup'"
        status=1
    fi
fi

# --- npm (fetches MathJax and the widget manager: tools/setup_web_assets.sh) -----------------
if ! command -v npm >/dev/null 2>&1 && ! install_deb npm /usr/bin/npm; then
    warn "npm is not installed: MathJax and the widget manager cannot be fetched ('apt-get install npm')"
fi

# --- Chromium (headless), for the offline browser test of the built book ----------------------
# Optional: tests/test_book.py skips its browser check when Chromium is missing, so a failure here
# only warns.
if ! command -v chromium >/dev/null 2>&1 && ! install_deb chromium /usr/bin/chromium; then
    warn "Chromium is not installed: the browser test of the book will be skipped ('apt-get install chromium')"
fi

# --- Jane Austen's novels (R data package, extracted without installing R) --------------------
austen_dir="$cache/system/janeaustenr"
austen_data="$austen_dir/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
if [ ! -e "$austen_data" ] && [ ! -e /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ]; then
    if can_apt; then
        apt_refresh_once r-cran-janeaustenr
        tmp=$(mktemp -d)
        # apt-get download writes to the current directory; _apt cannot write to mktemp's 0700 dir.
        chmod 755 "$tmp"
        say "apt-get download r-cran-janeaustenr (extracted to $austen_dir, R is not installed)"
        if (cd "$tmp" && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1) \
            && mkdir -p "$austen_dir" && dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$austen_dir"; then
            :
        else
            warn "could not fetch r-cran-janeaustenr from the Debian archive; the Austen chapters will tell you what to install"
            status=1
        fi
        rm -rf "$tmp"
    else
        warn "Austen's novels come from the Debian package r-cran-janeaustenr; without apt-get, install the R package janeaustenr and set BOOK_CACHE accordingly"
        status=1
    fi
fi

if [ "$status" = 0 ]; then
    say "system packages and data: OK"
fi
exit "$status"
