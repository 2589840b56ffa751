#!/usr/bin/env bash
# Start the embedded S3 server (SeaweedFS) in the background.
#   infra/local_s3/start.sh [DATA_DIR] [PORT]     defaults: .demo/s3, a free port
# Then: source DATA_DIR/s3.env
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
data_dir="${1:-$root/.demo/s3}"
args=(start --data-dir "$data_dir")
if [[ $# -ge 2 ]]; then args+=(--port "$2"); fi
cd "$root"
exec "$py" -m clman.local_s3 "${args[@]}"
