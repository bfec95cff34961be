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


def test_flip_test_changes_predictions_and_no_flip_is_the_plain_pass(weights, tmp_path, monkeypatch):
    from pipeline import inference
    from pipeline.inference import crop, crop_to_original, predict_crops, read_image
    from pipeline.weights import load_trained

    monkeypatch.setattr(inference, "FIRST_PASS_WINDOWS", ())  # one crop: the whole photo

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
    from pipeline.inference import BOX_SCORE, box_from_keypoints

    keypoints = np.array([[10, 20, 1.0], [30, 60, 0.5], [500, 500, BOX_SCORE / 2]], np.float32)  # the last: not confident
    x, y, w, h = box_from_keypoints(keypoints, 1.5)
    assert (w, h) == pytest.approx((30, 60))
    assert (x + w / 2, y + h / 2) == pytest.approx((20, 40))  # the joints' centre stays


def test_bare_photo_passes_follow_the_box_rule(weights, monkeypatch):
    """A bare photo: of the whole-photo and window crops, the FIRST_PASS_KEEP (2 here) with the highest mean
    peak are each refined: every later pass crops the previous joints' box grown by PASS_GROWS (x1.6, then
    x1.1 here), each exactly as predict_batch gives it; the answer is the refined crop with the highest mean
    peak. A boxed photo keeps its box through every pass."""
    from pipeline import inference
    from pipeline.weights import load_trained

    model, cfg, _ = load_trained(weights)
    images = [inference.read_image(str(SAMPLE / "images" / f"im{i:05d}.jpg")) for i in (161, 162)]
    given = [10, 10, 100, 150]
    monkeypatch.setattr(inference, "PASS_GROWS", (1.6, 1.1))
    monkeypatch.setattr(inference, "FIRST_PASS_KEEP", 2)
    got = inference.predict_images(model, cfg, images, [None, given], None, passes=3)

    def one(box):
        return inference.predict_batch(model, cfg, images[:1], [box], None)[0]

    def surest(kps):
        return max(kps, key=lambda kp: kp[:, 2].mean())

    windows = inference.first_pass_boxes(images[0])
    h, w = images[0].shape[:2]
    assert len(windows) == 1 + 9 * len(inference.FIRST_PASS_WINDOWS) and windows[0] == [0, 0, w, h]
    first = sorted((one(box) for box in windows), key=lambda kp: -kp[:, 2].mean())
    refined = [one(inference.box_from_keypoints(one(inference.box_from_keypoints(kp, 1.6)), 1.1)) for kp in first[:2]]
    np.testing.assert_allclose(got[0], surest(refined), atol=1e-5)
    np.testing.assert_allclose(got[1], inference.predict_batch(model, cfg, images[1:], [given], None)[0], atol=1e-5)
    # one pass: the surest first-pass crop itself
    np.testing.assert_allclose(inference.predict_images(model, cfg, images[:1], [None], None, passes=1)[0],
                               first[0], atol=1e-5)


def test_first_pass_windows_tile_the_photo():
    """Square windows of each share of the longer side, 3 x 3, from one corner to the other."""
    from pipeline.inference import FIRST_PASS_WINDOWS, first_pass_boxes

    boxes = np.array(first_pass_boxes(np.zeros((200, 400, 3), np.uint8)))
    side = FIRST_PASS_WINDOWS[0] * 400
    grid = boxes[1:10]
    assert np.allclose(grid[:, 2:], side)
    assert grid[:, 0].min() == pytest.approx(0) and (grid[:, 0] + side).max() == pytest.approx(400)
    # taller than the photo: the windows are centred on it vertically
    assert np.allclose(grid[:, 1] + side / 2, 100)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_passes_below_one_is_refused_by_name(command, weights, tmp_path, capsys):
    args = {"predict": ["--out", str(tmp_path / "p.json"), str(SAMPLE / "images" / "im00161.jpg")],
            "evaluate": ["--shards", str(tmp_path), "--photos", "bare"]}[command]
    with pytest.raises(SystemExit) as exit_:
        mshg([command, "--checkpoint", str(weights), "--passes", "0", *args])
    assert exit_.value.code == 2 and "argument --passes: must be >= 1; got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_by_name(weights, tmp_path, capsys):
    """The same rule as train.device (pipeline.distributed.pick_device), worded for the command's option."""
    assert mshg(["predict", "--checkpoint", str(weights), "--device", "cuda", "--out", str(tmp_path / "p.json"),
                 str(SAMPLE / "images" / "im00161.jpg")]) == 2
    assert "--device=cuda, but CUDA is not available" in capsys.readouterr().err


def test_evaluate_photos_scores_the_same_persons_as_the_validation_crops(weights, lspet_shards, tmp_path):
    """`mshg evaluate --photos boxes|bare` reads the photographs from the tars (not DALI's crops): every sample
    scored, against the same annotation, so the same persons count and the same ones are left out."""
    out = {}
    for how, extra in {"crops": [], "boxes": ["--photos", "boxes"], "bare": ["--photos", "bare", "--passes", "2"]}.items():
        path = tmp_path / f"{how}.json"
        assert mshg(["evaluate", "--checkpoint", str(weights), "--shards", str(lspet_shards["val"]),
                     "--out", str(path), *extra]) == 0
        out[how] = json.loads(path.read_text())
    for how in ("boxes", "bare"):
        assert [out[how][k] for k in ("samples", "persons", "left_out")] == \
            [out["crops"][k] for k in ("samples", "persons", "left_out")] == [16, out["crops"]["persons"], 16 - out["crops"]["persons"]]
        assert 0 <= out[how]["value"] <= 1 and len(out[how]["per_joint"]) == 14
