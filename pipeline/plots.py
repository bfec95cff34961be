"""Pictures for people: skeletons drawn on images, the prediction grid of an evaluation, and the
per-stage loss curves. Pure numpy/OpenCV/matplotlib (Agg); MLflow logging lives in `track.py`."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from shards.datasets import skeleton_for

PRED_COLOUR = (255, 64, 32)  # RGB
TRUTH_COLOUR = (40, 220, 40)


def draw_skeleton(image: np.ndarray, keypoints: np.ndarray, colour=PRED_COLOUR, thickness: int = 2,
                  labelled: np.ndarray | None = None, skeleton=None) -> np.ndarray:
    """A copy of the RGB uint8 image with the joints (x, y in its 0-based pixels) and limbs drawn.
    `labelled` (J,) bool: joints to leave out (e.g. unlabelled ground truth)."""
    out = np.ascontiguousarray(image.copy())
    pts = np.asarray(keypoints, np.float64)[:, :2]
    ok = np.isfinite(pts).all(1) if labelled is None else (np.asarray(labelled, bool) & np.isfinite(pts).all(1))
    shift = 4  # sub-pixel drawing
    ipts = np.round(pts * (1 << shift)).astype(np.int64) if ok.any() else None
    for a, b in skeleton if skeleton is not None else skeleton_for(len(pts)):
        if ok[a] and ok[b]:
            cv2.line(out, tuple(int(v) for v in ipts[a]), tuple(int(v) for v in ipts[b]), colour, thickness,
                     cv2.LINE_AA, shift)
    for j in np.flatnonzero(ok):
        cv2.circle(out, tuple(int(v) for v in ipts[j]), (thickness + 1) << shift, colour, -1, cv2.LINE_AA, shift)
    return out


def prediction_grid(results: dict, columns: int = 4, tile: int = 192, skeleton=None) -> np.ndarray | None:
    """Results of `evaluate.evaluate_loader` ({sample id: SampleResult}) -> one RGB image: every kept
    crop (sorted by sample id) with the ground truth (green) and the prediction (red) drawn, `tile` px
    a side."""
    kept = [(sid, r) for sid, r in sorted(results.items()) if r.image is not None]
    if not kept:
        return None
    tiles = []
    for sid, r in kept:
        pred, gt, crop = r.pred, r.gt, r.image
        zoom = tile / crop.shape[1]
        image = cv2.resize(crop, (tile, tile), interpolation=cv2.INTER_LINEAR)
        # crop coordinates are continuous: pixel centre of index i is i + 0.5
        image = draw_skeleton(image, gt[:, :2] * zoom - 0.5, TRUTH_COLOUR, 1, labelled=gt[:, 2] > 0, skeleton=skeleton)
        image = draw_skeleton(image, pred[:, :2] * zoom - 0.5, PRED_COLOUR, 2, skeleton=skeleton)
        cv2.putText(image, str(sid), (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(image)
    rows = -(-len(tiles) // columns)
    grid = np.zeros((rows * tile, min(columns, len(tiles)) * tile, 3), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = t
    return grid


def loss_curves(histories: dict[str, tuple[list[int], list[float]]], path: str | Path,
                title: str = "per-stage loss") -> Path:
    """{name: (steps, values)} -> a PNG with every curve on one log-scale plot."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    cmap = plt.get_cmap("viridis")
    names = sorted(histories, key=lambda n: (len(n), n))
    for k, name in enumerate(names):
        steps, values = histories[name]
        ax.plot(steps, values, label=name, color=cmap(k / max(len(names) - 1, 1)), linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for _, vals in histories.values() for v in vals):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
