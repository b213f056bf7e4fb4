#!/bin/sh
# Entry point of the K2 image: put the Postgres instance settings into DAGSTER_HOME (as
# `k2 run` puts the embedded dagster.yaml there), then run the service's command.
set -e
: "${K2_HOME:=/k2}"
: "${DAGSTER_HOME:=$K2_HOME/dagster}"
export K2_HOME DAGSTER_HOME
mkdir -p "$K2_HOME" "$DAGSTER_HOME"
cp /opt/k2/infra/dagster/dagster.postgres.yaml "$DAGSTER_HOME/dagster.yaml"
exec "$@"
