#!/usr/bin/env bash
# Stop the embedded S3 server started by start.sh (SIGTERM, SIGKILL after 30 s).
#   infra/local_s3/stop.sh [DATA_DIR]     default: .demo/s3
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
data_dir="${1:-$root/.demo/s3}"
cd "$root"
exec "$py" -m clman.local_s3 stop --data-dir "$data_dir"
