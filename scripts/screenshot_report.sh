#!/usr/bin/env bash
# Render REPORT_DIR/report.html (written by lens-eval --report) to a PNG with headless Chromium, offline.
# Usage: scripts/screenshot_report.sh REPORT_DIR OUT.png [WIDTH HEIGHT]   (default 1200 x 1600 pixels)
# The screenshot covers the window only: raise HEIGHT to capture more of a long report.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 4 ]]; then
    echo "usage: $0 REPORT_DIR OUT.png [WIDTH HEIGHT]" >&2
    exit 2
fi
report="$1/report.html"
out="$2"
width="${3:-1200}"
height="${4:-1600}"

if [[ ! -f "$report" ]]; then
    echo "error: $report not found; write it with lens-eval --report --out $1" >&2
    exit 2
fi
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$browser" ]]; then
    echo "error: Chromium not found; install it (Debian: apt-get install chromium)" >&2
    exit 2
fi

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
rm -f "$out_abs"
# --no-sandbox: Chromium's sandbox cannot start as root in containers. The other flags stop background
# network requests (updates, sync, field trials) so that rendering stays offline.
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --disable-default-apps --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out_abs" --window-size="$width,$height" "file://$(cd "$(dirname "$report")" && pwd)/report.html" \
    >"$profile/chromium.log" 2>&1 || status=$?
if [[ ! -s "$out_abs" ]]; then
    echo "error: Chromium (exit status ${status:-0}) wrote no screenshot to $out_abs; its last output:" >&2
    tail -n 20 "$profile/chromium.log" >&2
    exit 1
fi
echo "$out_abs"
