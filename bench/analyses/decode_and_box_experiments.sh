#!/usr/bin/env bash
# Decoding and bare-photo box-rule experiments on a trained run's weights, evaluation only (issue 19):
#
#   bench/analyses/decode_and_box_experiments.sh [RUN_DIR] [VAL_SHARDS] [GROUP...]
#       default: runs/lspet-cpu-recipe-r3 runs/shards/lspet-val, every group
#
# Groups:
#   dark    validation crops, the quarter-pixel shift (dark kernel 0) and DARK at kernels 3, 5, 7, 11
#   passes    `mshg predict`'s path on the bare photographs with 1, 2 and 3 passes (the default rule)
#   score     bare, the share of the best peak that makes a joint confident (BOX_SCORE) 0.0, 0.3
#   grow      bare, whole photo only, the second pass's box grown 1.0 / 1.2 / 1.4 / 1.6 / 1.9x (2 passes)
#   schedule  bare: whole photo + x1.4; + x1.0 (3 passes); windows 0.6 + x1.4 + x1.0; windows 0.4 and 0.6;
#             each keeping the surest crop only, then windows 0.6 keeping 2, 3 (the default) and 5
# pipeline.inference's BOX_SCORE and the search (PhotoSearch: grows, windows, keep; every pass at the run's full
# test, as --accurate) are set in-process.
# Each result also goes to runs/evals/*.json. About 1-4 minutes an evaluation on the 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
run=${1:-runs/lspet-cpu-recipe-r3}
val=${2:-runs/shards/lspet-val}
shift 2 || shift $#
groups=("${@:-dark passes score grow schedule}")
# shellcheck disable=SC2206
groups=(${groups[*]})
py=.venv/bin/python
tag=$(basename "$run")
mkdir -p runs/evals
evaluate() {  # BOX_SCORE, PASS_GROWS, FIRST_PASS_WINDOWS (comma-separated, - for none), FIRST_PASS_KEEP,
    local score=$1 grows=$2 windows=$3 keep=$4  # then mshg evaluate's arguments
    shift 4
    $py -c "import dataclasses, sys, pipeline.inference as inference, pipeline.evaluate as evaluate
floats = lambda text: tuple(float(v) for v in text.split(',') if v != '-')
inference.BOX_SCORE = float(sys.argv[1])
evaluate.FAST = dataclasses.replace(inference.ACCURATE, grows=floats(sys.argv[2]), windows=floats(sys.argv[3]),
                                   keep=int(sys.argv[4]))
from pipeline.cli import main; sys.exit(main(sys.argv[5:]))" "$score" "$grows" "$windows" "$keep" evaluate --checkpoint "$run" \
        --shards "$val" --batch-size 32 "$@" | grep "PCK@0.2 ="
}
for group in "${groups[@]}"; do
    case $group in
    dark)
        for k in 0 3 5 7 11; do
            echo "crops, dark kernel $k: $(evaluate 0.1 1.4,1.0 0.6 3 --dark-kernel "$k" --out "runs/evals/$tag-crops-dark$k.json")"
        done ;;
    passes)
        for passes in 1 2 3; do
            echo "bare photos, $passes passes: $(evaluate 0.1 1.4,1.0 0.6 3 --photos bare --passes "$passes" \
                --out "runs/evals/$tag-bare-p$passes.json")"
        done ;;
    score)
        for score in 0.0 0.3; do
            echo "bare photos, BOX_SCORE $score: $(evaluate "$score" 1.4,1.0 0.6 3 --photos bare \
                --out "runs/evals/$tag-bare-score$score.json")"
        done ;;
    grow)
        for grow in 1.0 1.2 1.4 1.6 1.9; do
            echo "bare photos, whole photo, second box grown x$grow: $(evaluate 0.1 "$grow" - 3 --photos bare \
                --passes 2 --out "runs/evals/$tag-bare-grow$grow.json")"
        done ;;
    schedule)
        echo "bare photos, whole photo, x1.4: $(evaluate 0.1 1.4 - 3 --photos bare --passes 2 \
            --out "runs/evals/$tag-bare-whole-x1.4.json")"
        echo "bare photos, whole photo, x1.4, x1.0: $(evaluate 0.1 1.4,1.0 - 3 --photos bare --passes 3 \
            --out "runs/evals/$tag-bare-whole-x1.4-x1.0.json")"
        for windows in 0.6 0.4,0.6; do
            echo "bare photos, windows $windows, x1.4, x1.0, keeping 1: $(evaluate 0.1 1.4,1.0 "$windows" 1 \
                --photos bare --passes 3 --out "runs/evals/$tag-bare-windows$windows.json")"
        done
        for keep in 2 3 5; do
            echo "bare photos, windows 0.6, x1.4, x1.0, keeping $keep: $(evaluate 0.1 1.4,1.0 0.6 "$keep" \
                --photos bare --passes 3 --out "runs/evals/$tag-bare-keep$keep.json")"
        done ;;
    *) echo "unknown group $group (dark passes score grow schedule)" >&2; exit 2 ;;
    esac
done
