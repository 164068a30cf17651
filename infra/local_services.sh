#!/usr/bin/env bash
# The production services, locally and on loopback only: a moto S3 server (in memory), an
# MLflow server (SQLite store, artefacts proxied to s3://$S3_BUCKET on moto) and a Prefect
# server. No Docker needed; everything runs from the repository's .venv.
#
#   infra/local_services.sh start [DIR]    # then: source DIR/services.env
#   infra/local_services.sh status [DIR]
#   infra/local_services.sh stop [DIR]
#
# DIR (default .services) holds pid files, logs, the SQLite files and services.env.
# Ports: S3_PORT (9000), MLFLOW_PORT (5000), PREFECT_PORT (4200). moto keeps objects in
# memory, so artefacts vanish on stop; MLflow's runs stay in DIR/mlflow.db.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CMD="${1:-}"
DIR="$(mkdir -p "${2:-${LOCAL_SERVICES_DIR:-$ROOT/.services}}" && cd "${2:-${LOCAL_SERVICES_DIR:-$ROOT/.services}}" && pwd)"
BIN="${VENV_BIN:-$ROOT/.venv/bin}"
S3_PORT="${S3_PORT:-9000}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
S3_BUCKET="${S3_BUCKET:-mlflow}"
SERVICES=(moto mlflow prefect)

# moto accepts any credentials; clients still need some to sign requests.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export PREFECT_HOME="$DIR/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

alive() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

# Each service leads its own process group (setsid), so stop also ends the workers it forked.
launch() {
  local name=$1; shift
  setsid "$@" > "$DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/$name.pid"
}

wait_http() {  # name url seconds
  local name=$1 url=$2 deadline=$((SECONDS + $3))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    if ! alive "$name"; then
      echo "$name exited during start; last lines of $DIR/$name.log:" >&2
      tail -n 20 "$DIR/$name.log" >&2
      return 1
    fi
    if (( SECONDS > deadline )); then
      echo "$name not ready at $url after $3 s; see $DIR/$name.log" >&2
      return 1
    fi
    sleep 0.5
  done
}

stop() {
  local name pid
  for name in "${SERVICES[@]}"; do
    [[ -f "$DIR/$name.pid" ]] || continue
    pid="$(cat "$DIR/$name.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$DIR/$name.pid"
    echo "stopped $name"
  done
  rm -f "$DIR/services.env"
}

start() {
  local name
  for name in "${SERVICES[@]}"; do
    if alive "$name"; then echo "$name already running (pid $(cat "$DIR/$name.pid")); run stop first" >&2; exit 1; fi
  done
  [[ -x "$BIN/mlflow" && -x "$BIN/moto_server" && -x "$BIN/prefect" ]] \
    || { echo "$BIN lacks mlflow, moto_server or prefect: make install" >&2; exit 1; }
  trap 'stop >/dev/null' ERR

  launch moto "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
  wait_http moto "http://127.0.0.1:$S3_PORT/" 30
  "$BIN/python" -c "import boto3; boto3.client('s3', endpoint_url='$MLFLOW_S3_ENDPOINT_URL').create_bucket(Bucket='$S3_BUCKET')"

  # The two slow starters start together; one worker each keeps them light on a shared machine.
  launch mlflow "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "s3://$S3_BUCKET/artifacts"
  launch prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_http mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 120
  wait_http prefect "http://127.0.0.1:$PREFECT_PORT/api/health" 120
  trap - ERR

  cat > "$DIR/services.env" <<ENV
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PIPELINE_TRACKING=on
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export S3_BUCKET=$S3_BUCKET
ENV
  echo "services up; source $DIR/services.env"
  cat "$DIR/services.env"
}

status() {
  local name
  for name in "${SERVICES[@]}"; do
    if alive "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
