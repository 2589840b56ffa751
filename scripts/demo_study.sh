#!/usr/bin/env bash
# A study (the paper's Table 2: GN+NL+MMA without / with contrastive pretraining) on the demo data,
# patient-level 3-fold, as shown in the README. Needs the demo's synthetic sweeps: run `make demo` first.
#   scripts/demo_study.sh [TABLES] [FOLDS]     default: 2 3 (6 trials + 3 SimCLR runs; ~35 min on 2 cores with
#   demo-cpu.yaml's 10-epoch finetune recipe before: the 40-epoch one trains each trial 4x as long)
# 1. starts the embedded S3 on .demo/s3;
# 2. ingests the demo sweeps again with --folds FOLDS (by patient, stratified) -> s3://clman-demo/data-cvFOLDS;
# 3. runs jobs.study on it -> s3://clman-demo/studies/demo-cvFOLDS (a rerun continues it with --resume);
# 4. copies study.md and roc.png to .demo/study/ and stops the S3 server.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
tables="${1:-2}"
folds="${2:-3}"
cfg=jobs/configs/demo-cpu.yaml
bucket=s3://clman-demo
name="demo-cv$folds"

infra/local_s3/start.sh .demo/s3
trap 'infra/local_s3/stop.sh .demo/s3' EXIT
set -a; source .demo/s3/s3.env; set +a

"$py" -m jobs.ingest --keep-ids --out "$bucket/data-cv$folds" --videos "$bucket/raw" --labels "$bucket/raw/labels.csv" \
    --folds "$folds" --seed 0
resume=()
if "$py" -c "import sys; from clman import storage; sys.exit(0 if storage.list_uris(sys.argv[1]) else 1)" \
    "$bucket/studies/$name/"; then
    resume=(--resume)
fi
"$py" -m jobs.study --manifest "$bucket/data-cv$folds/manifest.parquet" --out "$bucket/studies" \
    --run-name "$name" --folds "$folds" --seeds 1 --tables "$tables" --config "$cfg" "${resume[@]}"
mkdir -p .demo/study
for f in study.md roc.png; do
    "$py" -c "import sys; from clman import storage; sys.stdout.buffer.write(storage.read_bytes(sys.argv[1]))" \
        "$bucket/studies/$name/$f" > ".demo/study/$f"
done
echo "study: .demo/study/study.md"
