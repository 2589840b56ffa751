#!/usr/bin/env bash
# Label efficiency on the hard phantom: does contrastive pretraining on unlabelled sweeps help when
# few sweeps are labelled? The README's "Label efficiency" result was made with this script.
#   scripts/demo_label_efficiency.sh [CASES] [UNLABELED] [FOLDS] [FRACTIONS]
#   defaults: 268 labelled sweeps, 804 unlabelled (3x), 2 folds, 0.1,0.25,0.5,1 (~63 min on 2 CPU cores,
#   2026-12-07: 5 min making and ingesting the sweeps, 2 SimCLR runs of ~9.5 min, 24 trials of 67-131 s)
# 1. starts an embedded S3 of its own on .demo/label-efficiency/s3 (`make demo` starts .demo/s3 afresh every
#    time; this hour-long study must survive that to be resumed);
# 2. makes CASES labelled hard-phantom sweeps (seed 0) and UNLABELED more (seed 1, other patients)
#    and ingests both into one manifest with --folds FOLDS: the unlabelled ones go to split
#    'unlabeled' (empty label), never to finetuning or scoring;
# 3. runs jobs.study --label-fractions: CLMAN (SimCLR on the fold's training videos + the unlabelled
#    pool), gn_nl (the same network from scratch) and linear_probe (the SimCLR encoder frozen), each
#    at every share of the training patients; a rerun continues it with --resume;
# 4. copies study.md, summary.json, label_efficiency.png and roc.png to .demo/label-efficiency/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
cases="${1:-268}"
unlabeled="${2:-$((3 * cases))}"
folds="${3:-2}"
fractions="${4:-0.1,0.25,0.5,1}"
cfg=jobs/configs/demo-cpu.yaml
bucket=s3://clman-demo
data="$bucket/le-data-$cases-$unlabeled-cv$folds"
name="label-efficiency-$cases-$unlabeled-cv$folds"
raw="$root/.demo/label-efficiency/raw-$cases-$unlabeled"
s3dir=.demo/label-efficiency/s3
infra/local_s3/start.sh "$s3dir"
trap 'infra/local_s3/stop.sh "$s3dir"' EXIT
set -a; source "$s3dir/s3.env"; set +a
# the bucket, made on the first run
"$py" -c "import boto3, sys; c = boto3.client('s3'); n = sys.argv[1]
if n not in [b['Name'] for b in c.list_buckets()['Buckets']]: c.create_bucket(Bucket=n)" "${bucket#s3://}"

if [[ ! -f "$raw/labels.csv" ]]; then
    rm -rf "$raw.partial"
    "$py" -m jobs.synth --out "$raw.partial/labelled" --cases "$cases" --seed 0 --difficulty hard --no-progress
    "$py" -m jobs.synth --out "$raw.partial/unlabelled" --cases "$unlabeled" --seed 1 --difficulty hard --no-progress
    # One labels.csv: the labelled sweeps as they are, the others with an empty label and their own
    # patient ids (the two synthetic sets number their patients alike).
    "$py" - "$raw.partial" <<'EOF'
import sys
import pandas as pd
root = sys.argv[1]
lab = pd.read_csv(f"{root}/labelled/labels.csv", dtype=str)
unl = pd.read_csv(f"{root}/unlabelled/labels.csv", dtype=str)
lab["video"] = "labelled/" + lab["video"]
unl["video"] = "unlabelled/" + unl["video"]
unl["patient_id"] = "u-" + unl["patient_id"]
unl["label"] = ""
pd.concat([lab, unl[lab.columns]]).to_csv(f"{root}/labels.csv", index=False)
EOF
    mv "$raw.partial" "$raw"
fi
if ! "$py" -c "import sys; from clman import storage; sys.exit(0 if storage.exists(sys.argv[1]) else 1)" \
    "$data/manifest.parquet"; then
    "$py" -m jobs.ingest --keep-ids --out "$data" --videos "$raw" --labels "$raw/labels.csv" --folds "$folds" --seed 0
fi
resume=()
if "$py" -c "import sys; from clman import storage; sys.exit(0 if storage.list_uris(sys.argv[1]) else 1)" \
    "$bucket/studies/$name/"; then
    resume=(--resume)
fi
time "$py" -m jobs.study --manifest "$data/manifest.parquet" --out "$bucket/studies" --run-name "$name" \
    --folds "$folds" --seeds 1 --label-fractions "$fractions" --config "$cfg" "${resume[@]}"
out=.demo/label-efficiency
mkdir -p "$out"
for f in study.md summary.json label_efficiency.png roc.png; do
    "$py" -c "import sys; from clman import storage; sys.stdout.buffer.write(storage.read_bytes(sys.argv[1]))" \
        "$bucket/studies/$name/$f" > "$out/$f"
done
echo "label efficiency: $out/study.md"
