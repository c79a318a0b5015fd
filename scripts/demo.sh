#!/usr/bin/env bash
# The demo: a daemon on the built-in tiny model, one real job followed to its mp4, then
# a clean shutdown. Everything lives under .demo/ so it never touches your real state.
set -euo pipefail
VENV=${VENV:-.venv}
root=$(pwd)/.demo
export WANGEN_STATE_DIR=$root/state WANGEN_OUTPUT_DIR=$root/outputs
export WANGEN_SOCKET=$root/state/wangend.sock
unset WANGEN_URL WANGEN_TOKEN_FILE
mkdir -p "$root"
log=$root/wangend.log

"$VENV/bin/wangend" serve --port 0 --model tiny >"$log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do
  "$VENV/bin/wangenctl" status >/dev/null 2>&1 && break
  kill -0 $daemon 2>/dev/null || { echo "wangend exited early; its log:"; cat "$log"; exit 1; }
  sleep 0.1
done
echo "wangend is up (log: $log)"
"$VENV/bin/wangenctl" status
"$VENV/bin/wangenctl" submit "a red fox running through fresh snow, cinematic" --follow
"$VENV/bin/wangenctl" shutdown >/dev/null
wait $daemon
trap - EXIT
echo "daemon stopped; outputs are in $WANGEN_OUTPUT_DIR"
