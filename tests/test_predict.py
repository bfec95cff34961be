"""`mshg predict` on real images: batches, --boxes, --overlay, the flip test, an unreadable image."""
import json

import cv2
import numpy as np
import pytest
import torch

from pipeline.cli import main as mshg
from tests.conftest import SAMPLE
from tests.helpers import LSP_JOINTS

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them

def test_predict_batches_overlays_and_reports_unreadable_images(weights, tmp_path, capsys):
    images = [str(SAMPLE / "images" / f"im{i:05d}.jpg") for i in range(161, 166)]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    box = [10, 20, 60, 90]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({images[1]: box}))
    out, overlay = tmp_path / "preds.json", tmp_path / "overlay"
    args = ["predict", "--checkpoint", str(weights), "--out", str(out), "--boxes", str(boxes), "--overlay",
            str(overlay), "--batch-size", "2", images[0], images[1], str(bad), *images[2:]]
    assert mshg(args) == 0
    captured = capsys.readouterr()
    assert f"{bad}: cannot read or decode this image" in captured.err
    assert "predict" in captured.err  # the progress bar (3 batches)
    assert f"could not be read: {bad}" in captured.out
    preds = json.loads(out.read_text())
    assert preds["joints"] == LSP_JOINTS
    assert [p["image"] for p in preds["predictions"]] == images
    for p in preds["predictions"]:
        kp = np.array(p["keypoints"])
        assert kp.shape == (14, 3) and np.isfinite(kp).all()
    # with a box, the crop is the box padded by 1.25 around its centre: predictions lie in it
    kp = np.array(preds["predictions"][1]["keypoints"])
    side, cx, cy = 1.25 * max(box[2:]), box[0] + box[2] / 2, box[1] + box[3] / 2
    assert (np.abs(kp[:, 0] - cx) <= side / 2 + 1).all() and (np.abs(kp[:, 1] - cy) <= side / 2 + 1).all()
    # the overlays: one per readable image, the original size, with the skeleton drawn on it
    written = sorted(p.name for p in overlay.iterdir())
    assert written == sorted(f"im{i:05d}.jpg" for i in range(161, 166))
    for name in images:
        original = cv2.imread(name)
        drawn = cv2.imread(str(overlay / name.split("/")[-1]))
        assert drawn.shape == original.shape
        changed = np.abs(drawn.astype(int) - original.astype(int)).max(-1) > 60
        assert changed.sum() > 30


def test_flip_test_changes_predictions_and_no_flip_is_the_plain_pass(weights, tmp_path):
    from pipeline.inference import crop, crop_to_original, predict_crops, read_image
    from pipeline.weights import load_trained

    image_path = str(SAMPLE / "images" / "im00170.jpg")
    results = {}
    for flag in ([], ["--no-flip"]):
        out = tmp_path / f"p{len(flag)}.json"
        assert mshg(["predict", "--checkpoint", str(weights), "--out", str(out), "--passes", "1", *flag,
                     image_path]) == 0
        results[bool(flag)] = np.array(json.loads(out.read_text())["predictions"][0]["keypoints"])
    # --no-flip is exactly the model on the crop, decoded and mapped back
    model, cfg, _ = load_trained(weights)
    image = read_image(image_path)
    c, m = crop(image, [0, 0, image.shape[1], image.shape[0]], cfg.data.input_size, cfg.data.padding)
    kp = predict_crops(model, torch.from_numpy(c[None]))
    xy = crop_to_original(kp[..., :2], torch.from_numpy(m[None]))[0].numpy()
    np.testing.assert_allclose(results[True][:, :2], xy, atol=1e-3)
    assert not np.allclose(results[False][:, :2], results[True][:, :2])


def test_second_pass_box_is_the_confident_joints_grown_about_their_centre():
    from pipeline.inference import BOX_GROW, BOX_SCORE, box_from_keypoints

    keypoints = np.array([[10, 20, 1.0], [30, 60, 0.5], [500, 500, BOX_SCORE / 2]], np.float32)  # the last: not confident
    x, y, w, h = box_from_keypoints(keypoints)
    assert (w, h) == pytest.approx((20 * BOX_GROW, 40 * BOX_GROW))
    assert (x + w / 2, y + h / 2) == pytest.approx((20, 40))  # the joints' centre stays
