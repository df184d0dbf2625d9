#!/usr/bin/env bash
# Smoke test of a running mdp through the control service's HTTP facade:
# status, reload, a dry-run start, status while it runs, stop, status after.
# Exits non-zero, saying which step failed, on any failure (and stops the job it started).
#
#   BASE=http://127.0.0.1:8090 scripts/ingest_smoke.sh
#
# Environment:
#   BASE      the facade (default http://127.0.0.1:8090; the control service listens on
#             MDP_CONTROL__HTTP_PORT, and `mdp ingest status` shows its URL under "http")
#   TOKEN     bearer token when the facade wants one (default: $MDP_CONTROL__HTTP_TOKEN)
#   PROVIDER  provider to start (synthetic); SYMBOLS comma-separated (AAPL,MSFT)
#   JOB       job name (smoke-<pid>); WAIT_S seconds to wait for the job to run (30)
#   PYTHON    interpreter used to read JSON replies (python3)
set -euo pipefail

BASE="${BASE:-http://127.0.0.1:8090}"
BASE="${BASE%/}"
TOKEN="${TOKEN:-${MDP_CONTROL__HTTP_TOKEN:-}}"
PROVIDER="${PROVIDER:-synthetic}"
SYMBOLS="${SYMBOLS:-AAPL,MSFT}"
JOB="${JOB:-smoke-$$}"
WAIT_S="${WAIT_S:-30}"
PYTHON="${PYTHON:-python3}"

started=0
body=""

fail() {
    echo "FAIL: $*" >&2
    [[ -n "$body" ]] && echo "  last reply: $body" >&2
    exit 1
}

cleanup() {
    local code=$?
    if [[ $code -ne 0 && $started -eq 1 ]]; then
        echo "stopping job $JOB after the failure" >&2
        request POST stop "{\"job\": \"$JOB\", \"reason\": \"smoke_failed\"}" >/dev/null 2>&1 || true
    fi
    exit "$code"
}
trap cleanup EXIT

# request METHOD VERB [JSON]: sets $body and $status.
request() {
    local method=$1 verb=$2 data=${3:-}
    local args=(-sS -X "$method" -w '\n%{http_code}' --max-time 15 -H 'Accept: application/json')
    [[ -n "$TOKEN" ]] && args+=(-H "Authorization: Bearer $TOKEN")
    [[ -n "$data" ]] && args+=(-H 'Content-Type: application/json' --data "$data")
    local out
    out=$(curl "${args[@]}" "$BASE/runtime/ingest/$verb") || fail "$method $BASE/runtime/ingest/$verb: no answer"
    status=${out##*$'\n'}
    body=${out%$'\n'*}
}

# check PYTHON_EXPRESSION DESCRIPTION: the expression sees the last reply as `r`.
check() {
    REPLY_BODY="$body" "$PYTHON" -c '
import json, os, sys
r = json.loads(os.environ["REPLY_BODY"])
sys.exit(0 if eval(sys.argv[1]) else 1)
' "$1" 2>/dev/null || fail "$2"
}

# show PYTHON_EXPRESSION: print a value of the last reply.
show() {
    REPLY_BODY="$body" "$PYTHON" -c '
import json, os, sys
r = json.loads(os.environ["REPLY_BODY"])
print(eval(sys.argv[1]))
' "$1"
}

symbols_json=$("$PYTHON" -c 'import json, sys; print(json.dumps([s.strip() for s in sys.argv[1].split(",") if s.strip()]))' "$SYMBOLS")
job_expr="[j for j in r['jobs'] if j['job'] == '$JOB']"

echo "1/6 status ($BASE)"
request GET status
[[ $status == 200 ]] || fail "status answered HTTP $status"
check "r['ok'] is True and isinstance(r['jobs'], list)" "status reply is not ok"
check "'$PROVIDER' in r['providers']" "provider $PROVIDER is not configured"
echo "    jobs: $(show 'len(r["jobs"])'), policy revision $(show 'r["policy_revision"]')"

echo "2/6 reload"
request POST reload '{}'
[[ $status == 200 ]] || fail "reload answered HTTP $status"
check "r['ok'] is True and r['status'] == 'reloaded'" "reload was not applied"
echo "    policy revision $(show 'r["policy_revision"]')"

echo "3/6 start $PROVIDER $SYMBOLS as job $JOB (dry run)"
request POST start "{\"provider\": \"$PROVIDER\", \"symbols\": $symbols_json, \"job\": \"$JOB\", \"dry_run\": true}"
[[ $status == 200 ]] || fail "start answered HTTP $status"
started=1
check "r['ok'] is True and r['job']['job'] == '$JOB' and r['job']['dry_run'] is True" \
    "start did not return the dry-run job"

echo "4/6 status while running (up to ${WAIT_S}s)"
deadline=$((SECONDS + WAIT_S))
while :; do
    request GET status
    [[ $status == 200 ]] || fail "status answered HTTP $status"
    check "len($job_expr) == 1" "job $JOB is not listed while running"
    state=$(show "$job_expr[0]['state']")
    [[ $state == running ]] && break
    [[ $state == failed ]] && fail "job $JOB failed"
    ((SECONDS < deadline)) || fail "job $JOB is still '$state' after ${WAIT_S}s"
    sleep 0.5
done
check "$job_expr[0]['dry_run'] is True" "job $JOB is not a dry run"
echo "    state running, ticks $(show "$job_expr[0]['provider_state'].get('ticks', 0)")"

echo "5/6 stop"
request POST stop "{\"job\": \"$JOB\", \"reason\": \"smoke_test\"}"
[[ $status == 200 ]] || fail "stop answered HTTP $status"
check "r['ok'] is True and r['status'] == 'stopped'" "stop did not stop job $JOB"
started=0

echo "6/6 status after"
request GET status
[[ $status == 200 ]] || fail "status answered HTTP $status"
check "len($job_expr) == 0" "job $JOB is still listed after stop"
check "any(s['job'] == '$JOB' and s['reason'] == 'smoke_test' for s in r['stopped'])" \
    "the stop of $JOB is not recorded"

echo "OK: ingest smoke test passed against $BASE"
