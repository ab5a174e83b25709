#!/usr/bin/env bash
# MLflow tracking server for metafx searches: a database backend store and a served
# artifact store, bound to 127.0.0.1 unless you say otherwise.
#
#   bash cluster/mlflow_server.sh                  # SQLite + local artifacts under ~/mlflow, 127.0.0.1:5000
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow bash cluster/mlflow_server.sh
#
# Run it on the Ray head node: the search driver (the only MLflow writer; trials never
# talk to MLflow) runs there under `ray job submit`, so --tracking-uri http://127.0.0.1:5000
# works without exposing the server. Reach the UI through an SSH tunnel
# (ssh -L 5000:127.0.0.1:5000 head) or `kubectl port-forward`; see docs/cluster.md.
#
# Environment (the names are MLflow's own `mlflow server` variables):
#   MLFLOW_HOME                   base folder of the defaults below (default ~/mlflow)
#   MLFLOW_BACKEND_STORE_URI      SQLAlchemy URI (default sqlite:///$MLFLOW_HOME/mlflow.db);
#                                 postgresql://... needs `pip install psycopg2-binary`; put the
#                                 password in ~/.pgpass (mode 600), not in the URI
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts land, served through this server
#                                 (default $MLFLOW_HOME/artifacts; s3://, gs://, ... work too)
#   MLFLOW_HOST                   bind address (default 127.0.0.1). Another address is refused
#                                 unless MLFLOW_ALLOWED_HOSTS is also set (MLflow's Host-header
#                                 allow list): the server has no authentication of its own
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                server worker processes (default 2)
set -euo pipefail

MLFLOW_HOME="${MLFLOW_HOME:-$HOME/mlflow}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_HOME/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_HOME/artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"
python="${PYTHON:-python}"

case "$host" in
  127.0.0.1|localhost|::1) extra=() ;;
  *)
    if [ -z "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
      echo "error: MLFLOW_HOST=$host exposes an unauthenticated server beyond loopback; keep 127.0.0.1 and" \
           "use an SSH tunnel, or bind a private interface only and set MLFLOW_ALLOWED_HOSTS" >&2
      exit 2
    fi
    extra=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS") ;;
esac
case "$backend" in
  postgresql*)
    "$python" -c "import psycopg2" 2>/dev/null || { echo "error: pip install psycopg2-binary (PostgreSQL backend)" >&2; exit 2; } ;;
  sqlite:///*)
    mkdir -p "$(dirname "${backend#sqlite:///}")" ;;
esac
case "$artifacts" in
  *://*) ;;
  *) mkdir -p "$artifacts" ;;
esac

exec "$python" -m mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" --serve-artifacts \
  --host "$host" --port "$port" --workers "$workers" "${extra[@]}"
