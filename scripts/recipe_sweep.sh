#!/usr/bin/env bash
# A finetune-recipe sweep (learning rate x weight decay x label smoothing, ASHA on validation AUC) on a
# synthetic phantom at make demo's sizes (the sweeps of 2026-11-27; docs/recipes.md now compares
# recipes on held-out sets with scripts/recipe_probe.py, whose numbers chose the demo recipe).
#   scripts/recipe_sweep.sh [default|hard] [SAMPLES]     default: hard, 12 trials
# Works in .recipe-<difficulty>/ (its own S3 data dir); prints the trials table at the end.
# 1. starts the embedded S3; 2. makes 268 sweeps of the phantom (as jobs.demo makes them);
# 3. ingests them with a validation split (patients 60/20/20); 4. pretrains the encoder on the train
# split (SimCLR, demo-cpu preset); 5. sweeps the finetune recipe from tune_spaces/finetune_recipe.yaml
# over 20 epochs, ASHA stopping the weak trials from epoch 4.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
difficulty="${1:-hard}"
samples="${2:-12}"
cfg=jobs/configs/demo-cpu.yaml
work=".recipe-$difficulty"
bucket=s3://clman-recipe

"$py" -m clman.local_s3 start --data-dir "$work/s3" --bucket "${bucket#s3://}"
trap 'infra/local_s3/stop.sh "$work/s3"' EXIT
set -a; source "$work/s3/s3.env"; set +a

if [ "$difficulty" = default ]; then
    synth=(--size 64 --frames 24)  # what jobs.demo makes
else
    synth=(--difficulty hard)
fi
"$py" -m jobs.synth --out "$bucket/raw" --cases 268 --seed 0 "${synth[@]}" --no-progress
"$py" -m jobs.ingest --keep-ids --out "$bucket/data" --videos "$bucket/raw" --labels "$bucket/raw/labels.csv" \
    --split 0.6,0.2,0.2 --seed 0
"$py" -m jobs.pretrain --config "$cfg" --manifest "$bucket/data/manifest.parquet" \
    --out "$bucket/runs" --run-name pretrain
"$py" -m jobs.tune --job finetune --space tune_spaces/finetune_recipe.yaml --samples "$samples" \
    --scheduler asha --search random --grace-period 4 --seed 0 --config "$cfg" --set finetune.epochs=20 \
    --manifest "$bucket/data/manifest.parquet" --encoder "$bucket/runs/pretrain/encoder.pt" \
    --out "$bucket/sweeps" --run-name recipe
mkdir -p "$work/sweep"
for f in summary.md trials.csv best.yaml; do
    "$py" -c "import sys; from clman import storage; sys.stdout.buffer.write(storage.read_bytes(sys.argv[1]))" \
        "$bucket/sweeps/recipe/$f" > "$work/sweep/$f"
done
echo "sweep summary: $work/sweep/summary.md"
