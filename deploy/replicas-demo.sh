#!/usr/bin/env bash
# The replicas demo with Docker Compose (docs/deploy.md, Replicas): start Redis, two textgen replicas, the
# nginx balancer and Prometheus (docker-compose.replicas.yml); then deploy/replicas_demo.py, through the
# balancer on localhost:8080, starts a session, kills -9 the replica that served it
# (`docker compose kill -s KILL <service>`), continues the session on the other replica and checks the text
# against an uninterrupted reference. Everything is torn down on exit, success or not.
#
#   deploy/replicas-demo.sh [replicas_demo.py options...]     e.g. --tokens 80 --more 80
#
# Needs Docker with Compose v2 and, on the host, a Python with textgen installed (`pip install .`): the
# repository's .venv when there is one, else $PYTHON, else python3. Uses the host ports 8080 and 9091.
# TEXTGEN_SESSION_KEY is generated for the run unless set. Exits with the demo's status (0: equal texts).
set -euo pipefail
cd "$(dirname "$0")/.."

compose_file=docker-compose.replicas.yml
compose=(docker compose -f "$compose_file")
if [[ -n "${PYTHON:-}" ]]; then
  python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi

say() { printf 'replicas-demo: %s\n' "$*"; }

# The replicas' shared signing key, for this run only (the Compose file requires one).
if [[ -z "${TEXTGEN_SESSION_KEY:-}" ]]; then
  TEXTGEN_SESSION_KEY=$("$python" -c 'import secrets; print(secrets.token_hex(32))')
fi
export TEXTGEN_SESSION_KEY

cleanup() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    say "failed (exit $status); the last lines of each service's log:"
    "${compose[@]}" logs --no-color --tail 30 || true
  fi
  say "tearing down"
  "${compose[@]}" down --remove-orphans --timeout 20 || true
  exit "$status"
}
trap cleanup EXIT

say "building and starting (waits until every service with a health check is healthy)"
"${compose[@]}" up --detach --build --wait

# The replicas name themselves after their Compose service (TEXTGEN_REPLICA_NAME), so the name read from an
# answer's `textgen-replica` metadata is what `docker compose kill` takes.
say "running deploy/replicas_demo.py through the balancer"
"$python" deploy/replicas_demo.py --target localhost:8080 \
  --kill "docker compose -f $compose_file kill -s KILL {replica}" "$@"
