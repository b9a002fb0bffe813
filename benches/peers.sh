# Sourced by load.sh and callgrind.sh (needs $peers: the directory holding
# run-peers.sh and stop-peers.sh).
#
# stop-peers.sh only signals the peers, and Varnish takes a moment to let
# go of its port: run-peers.sh right after it (a second run straight after
# a first) would fail to bind. stop_peers waits, bounded, until the peers'
# ports (18081-18084) are free.
stop_peers() {
  if [ -f "$peers/stop-peers.sh" ]; then "$peers/stop-peers.sh" || true; fi
  for _ in $(seq 50); do
    ss -ltn | grep -qE '127\.0\.0\.1:1808[1-4] ' || return 0
    sleep 0.1
  done
}
