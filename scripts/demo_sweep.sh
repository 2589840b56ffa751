#!/usr/bin/env bash
# A finetune sweep (learning rate x MMA depth) on the demo data, as shown in the README.
# Needs the demo's synthetic sweeps: run `make demo` once first (they stay in .demo/s3).
#   scripts/demo_sweep.sh [SAMPLES]      default 12 trials; 18.2 min for 12 on 2 cores (2026-12-07, ASHA
#   stopping 9 of them early; one trial of all 20 epochs ~1.8 min; docs/sweeps.md)
# 1. starts the embedded S3 on .demo/s3;
# 2. ingests the demo sweeps again with a validation split (patients 60/20/20) -> s3://clman-demo/data-tune;
# 3. pretrains the encoder on that train split (SimCLR, demo-cpu preset);
# 4. sweeps finetune.lr x model.mma_depth with ASHA on validation AUC -> s3://clman-demo/sweeps/lr-depth;
# 5. copies summary.md and auc_vs_lr.png to .demo/sweep/ and stops the S3 server.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
samples="${1:-12}"
cfg=jobs/configs/demo-cpu.yaml
bucket=s3://clman-demo

infra/local_s3/start.sh .demo/s3
trap 'infra/local_s3/stop.sh .demo/s3' EXIT
set -a; source .demo/s3/s3.env; set +a

"$py" -m jobs.ingest --keep-ids --out "$bucket/data-tune" --videos "$bucket/raw" --labels "$bucket/raw/labels.csv" \
    --split 0.6,0.2,0.2 --seed 0
"$py" -m jobs.pretrain --config "$cfg" --manifest "$bucket/data-tune/manifest.parquet" \
    --out "$bucket/runs" --run-name pretrain-tune
"$py" -m jobs.tune --job finetune --space tune_spaces/finetune_lr_depth.yaml --samples "$samples" \
    --scheduler asha --search random --grace-period 2 --seed 0 --config "$cfg" \
    --manifest "$bucket/data-tune/manifest.parquet" --encoder "$bucket/runs/pretrain-tune/encoder.pt" \
    --out "$bucket/sweeps" --run-name lr-depth
mkdir -p .demo/sweep
for f in summary.md auc_vs_lr.png trials.csv best.yaml; do
    "$py" -c "import sys; from clman import storage; sys.stdout.buffer.write(storage.read_bytes(sys.argv[1]))" \
        "$bucket/sweeps/lr-depth/$f" > ".demo/sweep/$f"
done
echo "sweep summary: .demo/sweep/summary.md"
