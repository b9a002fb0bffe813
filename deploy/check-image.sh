#!/usr/bin/env bash
# Builds the container image (deploy/Dockerfile) and checks that it runs as
# deployed: `teamgate serve` on the image's own config (deploy/teamgate.toml)
# as uid 10001, ready with a real Redis, a managed key made through the
# admin API and accepted, an unknown key refused with a JSON body, no key or
# secret in its log, SIGHUP reloading (the managed key kept), and `docker
# stop` draining and exiting 0.
#
#   bash deploy/check-image.sh
#
# Needs docker and redis-server on this machine. The container shares the
# host's network (the config listens on 8080 and 9090, which must be free);
# Redis runs on 127.0.0.1:$REDIS_PORT (default 6391) for the check only.
# Upstream requests go to the real upstreams named in the config: where
# they cannot be reached the gateway's own 502 is expected, and accepted.
# DOCKER_BUILD_FLAGS adds flags to `docker build` (e.g. `--network host`
# where the daemon has no bridge network for the build to fetch crates).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-teamgate:check}
redis_port=${REDIS_PORT:-6391}
name=teamgate-check-$$
admin_token=check-admin-token-$$
upstream_secret=check-upstream-secret-$$
work=$(mktemp -d /tmp/teamgate-image-check.XXXXXX)

cleanup() {
  docker rm -f "$name" >/dev/null 2>&1 || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "check-image: $*" >&2; docker logs "$name" >&2 2>&1 || true; exit 1; }

for port in 8080 9090 "$redis_port"; do
  if ss -ltn | grep -qE "[:.]$port "; then fail "port $port is in use"; fi
done

echo "== building $image" >&2
# shellcheck disable=SC2086 # flags are words on purpose
docker build ${DOCKER_BUILD_FLAGS:-} -f deploy/Dockerfile -t "$image" . >&2

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --daemonize yes \
  --dir "$work" >/dev/null
docker run -d --name "$name" --network host \
  -e TEAMGATE_ADMIN_TOKEN="$admin_token" \
  -e TEAMGATE_REDIS_URL="redis://127.0.0.1:$redis_port" \
  -e COMFY_KEY_DESIGN="$upstream_secret" \
  -e SCN_KEY_DESIGN="$upstream_secret-key" \
  -e SCN_SECRET_DESIGN="$upstream_secret-secret" \
  "$image" >/dev/null

ready=""
for _ in $(seq 100); do
  if curl -fs -o /dev/null http://127.0.0.1:9090/readyz; then ready=yes; break; fi
  sleep 0.2
done
[ -n "$ready" ] || fail "not ready on 127.0.0.1:9090/readyz"
user=$(docker exec "$name" id -u)
[ "$user" = 10001 ] || fail "runs as uid $user, not 10001"

made=$(curl -fs -X POST -H "Authorization: Bearer $admin_token" \
  -H "content-type: application/json" -d '{"label":"image check"}' \
  http://127.0.0.1:9090/admin/teams/design/keys) || fail "the admin API made no key"
key=$(printf '%s' "$made" | python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])')

# A known key is let through: the upstream's answer, or the gateway's 502
# where the upstream cannot be reached from here, never 401.
known=$(curl -s -o "$work/answer" -w '%{http_code}' -H "Authorization: Bearer $key" \
  "http://127.0.0.1:8080/api/assets?limit=1")
case "$known" in
  401|403|000) fail "the managed key was refused ($known): $(cat "$work/answer")" ;;
esac
status=$(curl -s -o "$work/refused" -w '%{http_code}' -H "Authorization: Bearer tg_unknown" \
  "http://127.0.0.1:8080/api/assets")
[ "$status" = 401 ] || fail "an unknown key got $status, not 401"
python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["code"] == "unauthorized"' \
  "$work/refused" || fail "the 401 body is not the JSON error: $(cat "$work/refused")"

docker kill -s HUP "$name" >/dev/null
for _ in $(seq 50); do
  docker logs "$name" 2>&1 | grep -q '"config reloaded"' && break
  sleep 0.1
done
docker logs "$name" 2>&1 | grep -q '"config reloaded".*"client_keys":1' \
  || fail "SIGHUP did not reload with the managed key kept"

docker stop -t 30 "$name" >/dev/null
code=$(docker inspect "$name" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || fail "exited $code after docker stop"
docker logs "$name" > "$work/log" 2>&1
grep -q '"teamgate stopped"' "$work/log" || fail "no drain on SIGTERM"
for secret in "$key" "$admin_token" "$upstream_secret"; do
  if grep -qF "$secret" "$work/log"; then fail "a secret is in the log"; fi
done
echo "image $image: ready as uid 10001; a managed key let through (status $known);" \
  "an unknown key 401 with the JSON error; SIGHUP reloaded with the key kept;" \
  "docker stop drained and exited 0; no key or secret in the log"
