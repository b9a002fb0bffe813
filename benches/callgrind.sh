#!/usr/bin/env bash
# Instructions per cache hit and per pass-through of the running gateway,
# under callgrind: the whole server (connection loop, parse, stack, answer,
# tokio), not one function, and the same count for the bare-hyper limit
# server answering the same hit, and a second gateway at log level info
# answering it with an access line each (the telemetry target's cost,
# counted). Counted, not timed: the same binary gives
# the same figure within ~1% whatever else the machine is doing, so a
# change to the request path can be judged without the VM's noise
# (benches/README.md, "Instructions per hit").
#
#   bash benches/callgrind.sh                       # the release build
#   bash benches/callgrind.sh path/to/teamgate      # another build
#   CALLGRIND_KEEP=dir bash benches/callgrind.sh    # keep the profiles, for
#                                                   # callgrind_annotate
#
# Needs valgrind and wrk (installed from Debian when missing) and the peers
# (../shared/bench/peers, or TEAMGATE_BENCH_PEERS): their stand-in upstream
# fills the cache and answers pass-through, and their limit server is the
# reference. Loopback only; wrk runs 2 s to warm up and 4 s counted, per
# measurement. Prints one line per measurement; valgrind's software
# SHA-256 (it lacks the SHA extensions the gateway uses on this CPU) is
# shown apart.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
peers=${TEAMGATE_BENCH_PEERS:-$root/../shared/bench/peers}
binary=${1:-$root/target/release/teamgate}
port=18075
admin=18076
limit_port=18077
work=$(mktemp -d /tmp/teamgate-callgrind.XXXXXX)
pids=()
# shellcheck source=benches/peers.sh
source "$root/benches/peers.sh"
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_peers
  rm -rf "$work"
}
trap cleanup EXIT

if [ ! -f "$peers/run-peers.sh" ]; then
  echo "no peers at $peers (run-peers.sh); set TEAMGATE_BENCH_PEERS" >&2
  exit 2
fi
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v wrk >/dev/null || need+=(wrk)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$#" -gt 0 ] || cargo build --release --quiet
stop_peers
bash "$peers/run-peers.sh" >/dev/null

key=team-a-client-key
url_path="/api/assets?limit=20"
# The gateway's config at log level $1: "warn" writes no access lines,
# "info" writes one per request (JSON, to the log file), the load
# benchmark's telemetry pair.
config() {
cat <<EOF
[log]
level = "$1"
format = "json"
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
[upstreams.comfy]
base_url = "http://127.0.0.1:18081"
preset = "comfy-cloud"
[teams.team-a]
upstream_keys = { comfy = "env:BENCH_UPSTREAM_KEY" }
client_keys = ["sha256:$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)"]
EOF
}
config warn > "$work/teamgate.toml"
config info > "$work/teamgate-logged.toml"

# Runs $3.. under callgrind (output $work/$1.out), loads each of $urls
# in turn (warm-up, counters zeroed, counted run, dump) and prints
# "$1 <what>: N requests, I per request" for each.
count() { # $1 name, $2 ready-check url, $3.. command; urls: "what=url" words
  local name=$1 ready=$2; shift 2
  BENCH_UPSTREAM_KEY=comfy-team-a-secret TOKIO_WORKER_THREADS=1 \
    valgrind --tool=callgrind --callgrind-out-file="$work/$name.out" "$@" \
    >"$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 300); do curl -fs -o /dev/null "$ready" && break; sleep 0.2; done
  local entry what url dumps=0 requests total sha
  for entry in $urls; do
    what=${entry%%=*}; url=${entry#*=}
    curl -fs -o /dev/null -H "Authorization: Bearer $key" "$url" \
      || { echo "$name did not answer $url" >&2; cat "$work/$name.log" >&2; exit 1; }
    taskset -c 1 wrk -t1 -c8 -d2s -H "Authorization: Bearer $key" "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    requests=$(taskset -c 1 wrk -t1 -c8 -d4s -H "Authorization: Bearer $key" "$url" \
      | awk '/requests in/ {print $1}')
    callgrind_control -d "$pid" >/dev/null
    dumps=$((dumps + 1))
    local dump="$work/$name.out.$dumps"
    for _ in $(seq 50); do [ -s "$dump" ] && break; sleep 0.1; done
    total=$(awk '/^summary:/ {print $2}' "$dump")
    if [ -n "${CALLGRIND_KEEP:-}" ]; then
      mkdir -p "$CALLGRIND_KEEP" && cp "$dump" "$CALLGRIND_KEEP/$name-$what.out"
    fi
    sha=$(callgrind_annotate --threshold=100 --inclusive=yes "$dump" 2>/dev/null \
      | awk '/sha2::sha256::compress256 \[/ && !found {gsub(",", "", $1); print $1; found = 1}')
    python3 -c "
requests, total, sha = $requests, $total, ${sha:-0}
print(f'$name $what: {requests} requests, {total / requests:,.0f} instructions per request'
      + (f' ({(total - sha) / requests:,.0f} without the software SHA-256)' if sha else ''))"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

# Pass-through goes to the peers' stand-in upstream (outside valgrind): the
# figure is the gateway's own work for a forwarded read.
urls="hit=http://127.0.0.1:$port$url_path pass-through=http://127.0.0.1:$port/api/jobs"
count teamgate "http://127.0.0.1:$admin/readyz" "$binary" serve --config "$work/teamgate.toml"
# The access log's cost in instructions: the same hit with a line per
# request (the load benchmark's telemetry target, without the VM's noise).
urls="hit=http://127.0.0.1:$port$url_path"
count teamgate-logged "http://127.0.0.1:$admin/readyz" "$binary" serve --config "$work/teamgate-logged.toml"
urls="hit=http://127.0.0.1:$limit_port$url_path"
count limit "http://127.0.0.1:$limit_port$url_path" \
  /tmp/bench-limit-target/release/limit-server "127.0.0.1:$limit_port" "$peers/../assets.json"
