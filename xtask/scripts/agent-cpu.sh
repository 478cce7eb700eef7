#!/bin/bash
# The agent's own CPU (user + system, ms per s of wall time), two agent binaries in turn:
# idle (no VM) and with four VMs at 200 WBINVD/s each. Each agent is measured from 2 s after it
# was ready (its start-up, mostly the verifier, is not what is measured), over SECS seconds.
#
# usage: bash xtask/scripts/agent-cpu.sh OLD_AGENT NEW_AGENT [ROUNDS] [SECS]
# (as root; in the lab: `cargo xtask lab --kernel K --script` running this line)
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-3}; SECS=${4:-15}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GUEST=${IOASID_GUEST:-$ROOT/target/release/ioasid-guest}
STATE=/sys/fs/bpf/ioasid-agent-cpu
DIR=$(mktemp -d)
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)

measure() { # AGENT idle|busy
  rm -rf "$STATE" "$DIR/ready"
  "$1" --log warn run --dry-run --listen 127.0.0.1:0 --audit-log "$DIR/audit.jsonl" \
    --lock-file "$DIR/lock" --state-dir "$STATE" --ready-file "$DIR/ready" >/dev/null 2>&1 &
  local agent=$! guests=() g
  while [ ! -s "$DIR/ready" ]; do
    kill -0 $agent 2>/dev/null || { echo "agent $1 did not start" >&2; exit 1; }
    sleep 0.2
  done
  sleep 2
  if [ "$2" = busy ]; then
    for i in 1 2 3 4; do
      "$GUEST" --name "agent-cpu-$i" --rate 200 --duration $((SECS + 3)) >/dev/null 2>&1 &
      guests+=($!)
    done
    sleep 1
  fi
  local a b
  a=$(awk '{ print $14 + $15 }' /proc/$agent/stat)
  sleep "$SECS"
  b=$(awk '{ print $14 + $15 }' /proc/$agent/stat)
  for g in "${guests[@]}"; do kill $g 2>/dev/null; wait $g 2>/dev/null; done
  kill $agent; wait $agent
  awk -v a="$a" -v b="$b" -v s="$SECS" -v hz="$HZ" 'BEGIN { printf "%.1f", (b - a) * 1000 / hz / s }'
}

for r in $(seq "$ROUNDS"); do
  for load in idle busy; do
    o=$(measure "$OLD" $load) n=$(measure "$NEW" $load)
    echo "round $r $load: $OLD $o ms/s, $NEW $n ms/s"
  done
done
rm -rf "$STATE" "$DIR"
