#!/usr/bin/env bash
# Installs the Python tools the tests use into a cached virtual environment and prints its
# bin directory: openapi-spec-validator (is docs/openapi.json a valid OpenAPI document) and
# schemathesis (the fuzzing pass of scripts/fuzz-api.sh).
# Re-run cheaply: the environment is rebuilt only when this file's tool list changes.
set -euo pipefail
CACHE="${SCAIBUNKER_CACHE:-$HOME/.cache/scaibunker}"
TOOLS=("openapi-spec-validator==0.9.0" "schemathesis==4.32.5")
VENV="$CACHE/venv"
STAMP="$VENV/.scaibunker-tools"
want="${TOOLS[*]}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[python-tools] installing ${TOOLS[*]} into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${TOOLS[@]}" >&2
  printf '%s' "$want" > "$STAMP"
fi
echo "$VENV/bin"
