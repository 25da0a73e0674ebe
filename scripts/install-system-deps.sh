#!/usr/bin/env bash
# Installs the Debian packages that the browser and Prometheus tests use: chromium (headless rendering
# of the HTML report) and prometheus (promtool and the Prometheus server). Needs root and apt-get;
# elsewhere it says what to install and exits 0 (those tests then fail under CI=true, skip otherwise).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: please install the Debian packages: ${missing[*]}" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
fi
echo "install-system-deps: installed ${missing[*]}"
