#!/usr/bin/env bash
# Installs the system packages K2 needs when they are missing (Debian/Ubuntu, as root or
# with sudo). `--test` adds what the test suite needs beyond `make run`.
set -euo pipefail

need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
if [[ "${1:-}" == "--test" ]]; then
  :  # test-only tools are appended here by later features
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)  # tests/benchmarks/bench_api.py: the HTTP load generator
  command -v chromium >/dev/null 2>&1 || need+=(chromium)  # tests/ui: headless browser driven by Playwright
  # `k2 cluster` and tests/integration/test_cluster_services.py: Postgres for the Dagster instance
  # (Debian keeps the server binaries in /usr/lib/postgresql/<version>/bin, off PATH)
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
fi

if [[ ${#need[@]} -eq 0 ]]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "K2 needs: ${need[*]}. Install them with your system's package manager, then run make again." >&2
  exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "K2 needs: ${need[*]}; run as root or install sudo." >&2; exit 1; }
  sudo="sudo"
fi
echo "installing ${need[*]} from Debian's packages ..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
