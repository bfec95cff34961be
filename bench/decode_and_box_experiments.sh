#!/usr/bin/env bash
# Decoding and bare-photo box-rule experiments on a trained run's weights, evaluation only (issue 19):
#
#   bench/decode_and_box_experiments.sh [RUN_DIR] [VAL_SHARDS]
#       default: runs/lspet-cpu-recipe-r2 runs/shards/lspet-val
#
# Validation PCK@0.2 of the crops with the quarter-pixel shift (dark kernel 0) and DARK at kernels 3, 5,
# 7, 11; then `mshg predict`'s path on the bare photographs with 1, 2 and 3 passes, with the share of the
# best peak that makes a first-pass joint confident (pipeline.inference.BOX_SCORE) at 0.0 and 0.3, and
# with the second pass's box grown 1.2x and 1.4x about its centre (the box rule patched in-process).
# Each result also goes to runs/evals/*.json. About 13 minutes on the 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/lspet-cpu-recipe-r2}
val=${2:-runs/shards/lspet-val}
py=.venv/bin/python
mkdir -p runs/evals
evaluate() {  # BOX_SCORE, the second pass's box grown by this factor about its centre, mshg evaluate's arguments
    local score=$1 grow=$2
    shift 2
    $py -c "import sys, pipeline.inference as inference
inference.BOX_SCORE, grow, box_of = float(sys.argv[1]), float(sys.argv[2]), inference.box_from_keypoints
def grown(keypoints):
    box = box_of(keypoints)
    if box is None or grow == 1.0:
        return box
    x, y, w, h = box
    return [x - (grow - 1) * w / 2, y - (grow - 1) * h / 2, grow * w, grow * h]
inference.box_from_keypoints = grown
from pipeline.cli import main; sys.exit(main(sys.argv[3:]))" "$score" "$grow" evaluate --checkpoint "$run" \
        --shards "$val" --batch-size 32 "$@" | grep "PCK@0.2 ="
}
for k in 0 3 5 7 11; do
    echo "crops, dark kernel $k: $(evaluate 0.1 1.0 --dark-kernel "$k" --out "runs/evals/crops-dark$k.json")"
done
for passes in 1 2 3; do
    echo "bare photos, $passes passes: $(evaluate 0.1 1.0 --photos bare --passes "$passes" --out "runs/evals/bare-p$passes.json")"
done
for score in 0.0 0.3; do
    echo "bare photos, BOX_SCORE $score: $(evaluate "$score" 1.0 --photos bare --out "runs/evals/bare-score$score.json")"
done
for grow in 1.2 1.4; do
    echo "bare photos, second box grown x$grow: $(evaluate 0.1 "$grow" --photos bare --out "runs/evals/bare-grow$grow.json")"
done
