#!/usr/bin/env bash
# Azurite, Microsoft's Azure Storage emulator (npm package), for the object-storage tests
# (tests/storage): installed once into .tools/azurite, only if missing. The tests start it
# themselves on a free loopback port with --disableTelemetry. moto's S3 server, the other
# emulator, is a Python package in the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
AZURITE_VERSION=3.35.0
dest=.tools/azurite
if [ -x "$dest/node_modules/.bin/azurite-blob" ]; then
  exit 0
fi
if ! command -v npm >/dev/null && command -v apt-get >/dev/null; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
  { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm ||
    { "${as_root[@]}" apt-get update -q &&
      "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
  } >/dev/null 2>&1 || true
fi
if ! command -v npm >/dev/null; then
  echo "warning: no npm to install Azurite; the Azure Blob tests will be skipped" >&2
  exit 0
fi
mkdir -p "$dest"
log=$(mktemp)
if ! npm install --prefix "$dest" --no-audit --no-fund --loglevel=error \
    "azurite@$AZURITE_VERSION" >"$log" 2>&1; then
  cat "$log" >&2
  echo "warning: could not install Azurite; the Azure Blob tests will be skipped" >&2
fi
rm -f "$log"
