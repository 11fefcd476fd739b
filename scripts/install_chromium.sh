#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/browser); installed once, only if missing.
set -euo pipefail
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
  apt_log=$(mktemp)
  if ! { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium ||
         { "${as_root[@]}" apt-get update -q &&
           "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
       } >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    echo "warning: could not install chromium; the browser tests will be skipped" >&2
  fi
  rm -f "$apt_log"
fi
