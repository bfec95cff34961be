#!/usr/bin/env bash
# Decoding and bare-photo box-rule experiments on a trained run's weights, evaluation only (issue 19):
#
#   bench/decode_and_box_experiments.sh [RUN_DIR] [VAL_SHARDS] [GROUP...]
#       default: runs/lspet-cpu-recipe-r3 runs/shards/lspet-val, every group
#
# Groups:
#   dark    validation crops, the quarter-pixel shift (dark kernel 0) and DARK at kernels 3, 5, 7, 11
#   passes  `mshg predict`'s path on the bare photographs with 1, 2 and 3 passes
#   score   bare, the share of the best peak that makes a first-pass joint confident (BOX_SCORE) 0.0, 0.3
#   grow    bare, the second pass's box grown 1.0 / 1.2 / 1.4 / 1.6 / 1.9x about its centre (one crop)
#   grows   bare, several growths tried and the crop the model is surest of kept (pipeline.inference.BOX_GROWS)
# pipeline.inference's BOX_SCORE and BOX_GROWS are set in-process for each evaluation. Each result also goes
# to runs/evals/*.json. About 1-2 minutes an evaluation on the 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/lspet-cpu-recipe-r3}
val=${2:-runs/shards/lspet-val}
shift 2 || shift $#
groups=("${@:-dark passes score grow grows}")
# shellcheck disable=SC2206
groups=(${groups[*]})
py=.venv/bin/python
tag=$(basename "$run")
mkdir -p runs/evals
evaluate() {  # BOX_SCORE, BOX_GROWS (comma-separated), mshg evaluate's arguments
    local score=$1 grows=$2
    shift 2
    $py -c "import sys, pipeline.inference as inference
inference.BOX_SCORE = float(sys.argv[1])
inference.BOX_GROWS = tuple(float(g) for g in sys.argv[2].split(','))
from pipeline.cli import main; sys.exit(main(sys.argv[3:]))" "$score" "$grows" evaluate --checkpoint "$run" \
        --shards "$val" --batch-size 32 "$@" | grep "PCK@0.2 ="
}
for group in "${groups[@]}"; do
    case $group in
    dark)
        for k in 0 3 5 7 11; do
            echo "crops, dark kernel $k: $(evaluate 0.1 1.4 --dark-kernel "$k" --out "runs/evals/$tag-crops-dark$k.json")"
        done ;;
    passes)
        for passes in 1 2 3; do
            echo "bare photos, $passes passes: $(evaluate 0.1 1.4 --photos bare --passes "$passes" \
                --out "runs/evals/$tag-bare-p$passes.json")"
        done ;;
    score)
        for score in 0.0 0.3; do
            echo "bare photos, BOX_SCORE $score: $(evaluate "$score" 1.4 --photos bare --out "runs/evals/$tag-bare-score$score.json")"
        done ;;
    grow)
        for grow in 1.0 1.2 1.4 1.6 1.9; do
            echo "bare photos, second box grown x$grow: $(evaluate 0.1 "$grow" --photos bare \
                --out "runs/evals/$tag-bare-grow$grow.json")"
        done ;;
    grows)
        for grows in 1.2,1.6 1.2,1.6,2.2 1.0,1.4,2.0,2.8; do
            echo "bare photos, the surest of growths $grows: $(evaluate 0.1 "$grows" --photos bare \
                --out "runs/evals/$tag-bare-grows$grows.json")"
        done ;;
    *) echo "unknown group $group (dark passes score grow grows)" >&2; exit 2 ;;
    esac
done
