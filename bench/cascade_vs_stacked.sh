#!/usr/bin/env bash
# The study (issue 10): MSC-HG against Newell's stacked hourglass at the same FLOPs per image, on the
# same data, recipe and wall-time budget, two seeds each; then the table and the PCK-vs-minutes plot.
#
#   bench/cascade_vs_stacked.sh [MINUTES] [SEEDS...]     default: 30 minutes, seeds 1 2
#   EVAL_EVERY=STEPS OVERRIDES="key=value ..." bench/cascade_vs_stacked.sh ...   (both models get OVERRIDES)
#   TAG=r3 bench/cascade_vs_stacked.sh ...   runs named study-r3-cascade-20min-seed1 ..., beside earlier studies
#
# Runs `mshg train --ranks 2` four times, one after the other (each run owns the 2 cores), with
# configs/lspet_cpu.yaml (the cascade) and configs/lspet_cpu_stacked.yaml (the stack, widened to the
# cascade's FLOPs), then bench/study_table.py, which reads the runs back from MLflow, writes
# docs/results/cascade_study.md's study section (table, run ids) and docs/pck_vs_minutes.png, and logs the plot to
# MLflow. Needs the LSPET shards of the README (runs/shards/lspet-train, runs/shards/lspet-val).
# Every run is resumable: rerunning the script continues unfinished runs from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
shift || true
seeds=("${@:-1 2}")
# shellcheck disable=SC2206
seeds=(${seeds[*]})
mshg=${MSHG:-.venv/bin/mshg}
eval_every=${EVAL_EVERY:-1000}  # steps; ~4 evaluations in 30 minutes at the recipe's speed
# shellcheck disable=SC2206
overrides=(${OVERRIDES:-})  # e.g. the settings of an earlier recipe, to reproduce an earlier study
tag=${TAG:+$TAG-}
runs=()
for seed in "${seeds[@]}"; do
    for model in cascade stacked; do
        config=configs/lspet_cpu.yaml
        [[ $model == stacked ]] && config=configs/lspet_cpu_stacked.yaml
        name="study-${tag}${model}-${minutes}min-seed${seed}"
        runs+=("$name")
        if [[ -f runs/$name/summary.txt ]]; then echo "== $name: done already"; continue; fi
        echo "== $name ($config, $minutes min, seed $seed)"
        "$mshg" train --ranks 2 --config "$config" "stop.max_minutes=$minutes" "data.seed=$seed" \
            "train.eval_every=$eval_every" "train.run_name=$name" "train.checkpoint_every=$eval_every" \
            "${overrides[@]}"
    done
done
.venv/bin/python bench/study_table.py "${runs[@]}"
