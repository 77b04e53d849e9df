#!/usr/bin/env bash
# The API fuzzing pass (a step of scripts/test): a real `scaibunker up` (controller, worker,
# QEMU microVMs) on a fresh data directory, and schemathesis (PyPI, in the cached virtual
# environment of scripts/python-tools.sh) generating requests from docs/openapi.json for every
# operation, with and without the super-admin key. It fails on
#   - any 5xx answer (not_a_server_error),
#   - a schema-valid request refused with 400/422 (positive_data_acceptance: the document
#     must state every constraint the server enforces),
#   - an answer the document does not describe (status code, content type, headers, body).
# Usage: scripts/fuzz-api.sh [--bin DIR] [--max-examples N] [--seed N]
# (DIR holds the built `scaibunker` and `scaibunker-worker`; default "$CARGO_TARGET_DIR/debug".)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SCAIBUNKER_CACHE:-$HOME/.cache/scaibunker}"
BIN="${CARGO_TARGET_DIR:-$CACHE/target}/debug"
EXAMPLES=25
SEED=20261203
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --max-examples) EXAMPLES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    *) echo "usage: $0 [--bin DIR] [--max-examples N] [--seed N]" >&2; exit 2 ;;
  esac
done

PYTOOLS="$(bash scripts/python-tools.sh)"
WORK="$(mktemp -d /tmp/scaibunker-fuzz.XXXXXX)"
UP_PID=""
cleanup() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$UP_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# A free loopback port.
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"

echo "[fuzz] starting scaibunker up on $URL (data in $WORK/data)" >&2
# Bunker networks off: they change the host (a table, forwarding), and fuzzed creates of
# `unrestricted` bunkers would get real egress; their worker then fails them with the reason,
# which is a schema-valid answer too. The network tests run in their own namespace.
SCAIBUNKER_NETWORKS=off SCAIBUNKER_RATE_LIMIT_PER_MIN=1000000 "$BIN/scaibunker" up --data-dir "$WORK/data" --listen "127.0.0.1:$PORT" >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 3000); do
  grep -q '^ready ' "$WORK/up.log" && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log" >&2; echo "[fuzz] up exited" >&2; exit 1; }
  sleep 0.1
done
grep -q '^ready ' "$WORK/up.log" || { cat "$WORK/up.log" >&2; echo "[fuzz] up not ready in 300 s" >&2; exit 1; }
KEY="$(cat "$WORK/data/admin.key")"
AUTH="Authorization: Bearer $KEY"
API="$URL/v1/modules/scaibunker"

# At most two bunkers at a time (this machine's rule for tests): the platform default profile
# caps every tenant, so further creates are 429 BUNKER_QUOTA_EXCEEDED, an answer the document
# allows. The rate limit is lifted so that every answer is a real one.
curl -fsS -H "$AUTH" -H 'content-type: application/json' \
  -d '{"name":"fuzz-cap","max_concurrent_bunkers":2}' "$API/quota-profiles" >/dev/null

# The bunker the bunker routes act on.
FUZZ_BUNKER_ID="$(curl -fsS -H "$AUTH" -H 'content-type: application/json' \
  -d '{"image":"tiny","max_lifetime_s":3600}' "$API/bunkers" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["id"])')"
export FUZZ_BUNKER_ID
echo "[fuzz] bunker $FUZZ_BUNKER_ID" >&2

CHECKS=not_a_server_error,positive_data_acceptance,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance
run() {
  local label="$1"; shift
  case " $* " in *" --phases "*) ;; *) set -- --phases examples,coverage,fuzzing "$@" ;; esac
  echo "[fuzz] schemathesis: $label" >&2
  PYTHONPATH=scripts/fuzz SCHEMATHESIS_HOOKS=hooks \
  "$PYTOOLS/schemathesis" --config-file scripts/fuzz/schemathesis.toml run docs/openapi.json \
    --url "$URL" --checks "$CHECKS" \
    --max-examples "$EXAMPLES" --seed "$SEED" --workers 1 \
    --request-timeout 120 --no-color --generation-database none \
    "$@"
}

# The operations that can take the fuzzer's own access away (revoking its key, draining the
# worker, replacing the worker's credential) run last, so everything else is fuzzed with a
# working key and a working worker.
LOCKOUT='^/v1/(api-keys/\{id\}|modules/scaibunker/workers/\{id\}/(drain|credential/(rotate|reset)))$'

# Archives: a tarball's format is not a schema, so a generated body is rarely a tar and its
# refusal (`422 INVALID_ARCHIVE`) is right; they are fuzzed for everything but that.
ARCHIVES='/files/archive$'

status=0
run admin -H "$AUTH" --exclude-path-regex "$LOCKOUT|$ARCHIVES" || status=1
run archives -H "$AUTH" --include-path-regex "$ARCHIVES" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance ||
  status=1
# Nothing before this point may have locked the fuzzer out (a run of 401s passes every check).
code="$(curl -s -o /dev/null -w '%{http_code}' -H "$AUTH" "$URL/v1/tenants")"
if [ "$code" != 200 ]; then
  echo "[fuzz] the admin key no longer works after the main pass (HTTP $code)" >&2
  status=1
fi
run anonymous || status=1
# The fuzzer's bunkers go now, while the key works, so the stop has nothing to save.
python3 - "$API" "$KEY" <<'EOF' || true
import json, sys, urllib.request
api, key = sys.argv[1], sys.argv[2]
def call(method, path):
    req = urllib.request.Request(api + path, method=method, headers={"Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)
for b in call("GET", "/bunkers?limit=500")["data"]:
    if b["status"] not in ("terminated", "failed"):
        try:
            call("DELETE", "/bunkers/" + b["id"])
        except Exception as e:
            print(f"[fuzz] deleting {b['id']}: {e}", file=sys.stderr)
EOF

run lockout -H "$AUTH" --include-path-regex "$LOCKOUT" || status=1


if [ "$status" -ne 0 ]; then
  echo "[fuzz] FAILED; the controller's log:" >&2
  tail -n 200 "$WORK/up.log" >&2
fi
exit "$status"
