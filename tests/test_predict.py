"""`mshg predict` on real images: sources (files, folders, globs, videos) and what cannot be read, image modes as
a viewer shows them, batches, --boxes, --overlay, the formats (json, jsonl as it goes, coco), the flip test, the
coarse-to-fine search of a photo without a box, the exit status."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main as mshg
from tests.conftest import SAMPLE
from tests.helpers import LSP_JOINTS, REPO

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them


def photo(i: int) -> str:
    return str(SAMPLE / "images" / f"im{i:05d}.jpg")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's convolutions run several times faster on one thread than on threads that share the
    cores with other work (a training, the other xdist worker); the results are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def predict(weights, *args: str) -> int:
    return mshg(["predict", "--checkpoint", str(weights), *args])


def summary_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("wrote ")]
    assert len(lines) == 1, out
    return lines[0]


def keypoints_of(path) -> dict[str, np.ndarray]:
    return {p["image"]: np.array(p["keypoints"]) for p in json.loads(path.read_text())["predictions"]}


def test_predict_batches_overlays_and_reports_unreadable_images(weights, tmp_path, capsys):
    images = [photo(i) for i in range(161, 166)]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    box = [10, 20, 60, 90]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({images[1]: box}))
    out, overlay = tmp_path / "preds.json", tmp_path / "overlay"
    assert predict(weights, "--out", str(out), "--boxes", str(boxes), "--overlay", str(overlay), "--batch-size", "2",
                   images[0], images[1], str(bad), *images[2:]) == 0
    captured = capsys.readouterr()
    assert f"skipped {bad}: cannot read or decode this image" in captured.err
    line = summary_line(captured.out)
    assert line.startswith(f"wrote 5 predictions (0 of them video frames) to {out}")
    assert line.endswith("; 1 skipped (1 cannot read or decode this image)")
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


def test_folders_globs_and_bad_sources_each_cost_only_themselves(weights, tmp_path, capsys):
    """A folder (its images, sorted; other files ignored), a recursive glob, a missing path, a pattern matching
    nothing, an empty folder and an undecodable file in one call: every good image predicted, in order, and each
    bad source named on stderr with its reason and counted in the summary."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in (163, 161):
        shutil.copy(photo(i), folder / f"im{i:05d}.jpg")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "more" / "deep").mkdir(parents=True)
    shutil.copy(photo(164), tmp_path / "more" / "a.jpg")
    shutil.copy(photo(165), tmp_path / "more" / "deep" / "b.jpg")
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n and then nothing of a PNG")
    missing, nothing = tmp_path / "missing.jpg", str(tmp_path / "none" / "*.jpg")
    pattern = str(tmp_path / "more" / "**" / "*.jpg")  # as the shell passes a quoted pattern
    out = tmp_path / "p.json"
    assert predict(weights, "--out", str(out), "--batch-size", "3", str(folder), pattern, str(missing), nothing,
                   str(tmp_path / "empty"), str(bad), photo(166)) == 0
    captured = capsys.readouterr()
    good = [str(folder / "im00161.jpg"), str(folder / "im00163.jpg"), str(tmp_path / "more" / "a.jpg"),
            str(tmp_path / "more" / "deep" / "b.jpg"), photo(166)]
    preds = json.loads(out.read_text())["predictions"]
    assert [p["image"] for p in preds] == good
    assert all(np.array(p["keypoints"]).shape == (14, 3) and np.isfinite(p["keypoints"]).all() for p in preds)
    for name, reason in [(missing, "no such file or folder"), (nothing, "no file matches this pattern"),
                         (tmp_path / "empty", "no images or videos in this folder"),
                         (bad, "cannot read or decode this image")]:
        assert f"skipped {name}: {reason}" in captured.err
    assert "notes.txt" not in captured.err + out.read_text()
    line = summary_line(captured.out)
    assert line.startswith(f"wrote 5 predictions (0 of them video frames) to {out}; 4 skipped (")
    for reason in ("no such file or folder", "no file matches this pattern", "no images or videos in this folder",
                   "cannot read or decode this image"):
        assert f"1 {reason}" in line


def exif_rotated(pixels: np.ndarray, orientation: int) -> Image.Image:
    """The pixels stored turned so that a viewer applying EXIF `orientation` (6: turn 90 degrees clockwise, 8:
    counter-clockwise) shows `pixels`."""
    return Image.fromarray(np.ascontiguousarray(np.rot90(pixels, 1 if orientation == 6 else -1)))


def write_image_modes(tmp_path) -> dict[str, tuple]:
    """name -> (path, the RGB a viewer shows, tolerance of the mean absolute difference): one file per mode."""
    src = Image.open(photo(170)).convert("RGB")
    rgb = np.asarray(src)
    gray = np.asarray(src.convert("L"))
    gray3 = np.repeat(gray[..., None], 3, -1)
    files = {}
    src.convert("L").save(tmp_path / "gray.jpg", quality=95)
    files["gray"] = (tmp_path / "gray.jpg", gray3, 2.0)
    src.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    files["cmyk"] = (tmp_path / "cmyk.jpg", rgb, 3.0)
    rgba = np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])
    rgba[:, :40, 3] = 0  # a transparent band: white as a viewer shows it on a white page
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    seen = rgb.copy()
    seen[:, :40] = 255
    files["alpha"] = (tmp_path / "alpha.png", seen, 0.0)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 65535 is white
    files["gray16"] = (tmp_path / "gray16.png", gray3, 0.0)
    src.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(tmp_path / "palette.png")
    files["palette"] = (tmp_path / "palette.png", rgb, 3.0)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_rotated(rgb, 6).save(tmp_path / "exif6.jpg", exif=exif, quality=95)
    files["exif6"] = (tmp_path / "exif6.jpg", rgb, 3.0)
    exif[0x0112] = 8
    exif_rotated(rgb, 8).save(tmp_path / "exif8.png", exif=exif)
    files["exif8"] = (tmp_path / "exif8.png", rgb, 0.0)
    return files


def test_read_image_gives_rgb_as_a_viewer_shows_it(tmp_path):
    from pipeline.inference import read_image

    files = write_image_modes(tmp_path)
    modes = {}
    for name, (path, _, _) in files.items():
        with Image.open(path) as image:
            modes[name] = image.mode
    assert modes == {"gray": "L", "cmyk": "CMYK", "alpha": "RGBA", "gray16": "I;16", "palette": "P",
                     "exif6": "RGB", "exif8": "RGB"}  # the files are what they claim to be
    for name, (path, seen, tolerance) in files.items():
        got = read_image(str(path))
        assert got.dtype == np.uint8 and got.shape == seen.shape, name  # the EXIF ones turned upright
        diff = np.abs(got.astype(int) - seen.astype(int))
        assert diff.mean() <= tolerance, (name, diff.mean())
        # the tolerance tells a right image from a wrong one: upside down, it is several times that far off
        assert np.abs(got.astype(int) - np.flipud(seen).astype(int)).mean() > 5 * max(tolerance, 3), name
    assert (read_image(str(files["alpha"][0]))[:, :40] == 255).all()


def test_predict_takes_every_image_mode_and_exif_rotation(weights, tmp_path, capsys):
    from pipeline.inference import read_image

    files = write_image_modes(tmp_path)
    # the same pixels stored upright (lossless): the EXIF-rotated files must give the same keypoints
    Image.fromarray(read_image(str(files["exif6"][0]))).save(tmp_path / "exif6_upright.png")
    Image.fromarray(files["exif8"][1]).save(tmp_path / "exif8_upright.png")
    inputs = [str(path) for path, _, _ in files.values()] + [str(tmp_path / "exif6_upright.png"),
                                                              str(tmp_path / "exif8_upright.png")]
    out = tmp_path / "p.json"
    assert predict(weights, "--out", str(out), "--batch-size", "1", *inputs) == 0
    captured = capsys.readouterr()
    assert "skipped" not in captured.err + captured.out
    assert summary_line(captured.out) == f"wrote {len(inputs)} predictions (0 of them video frames) to {out}"
    kps = keypoints_of(out)
    assert list(kps) == inputs and all(kp.shape == (14, 3) and np.isfinite(kp).all() for kp in kps.values())
    for name in ("exif6", "exif8"):
        np.testing.assert_allclose(kps[str(files[name][0])], kps[str(tmp_path / f"{name}_upright.png")], atol=1e-4)


def test_jsonl_is_written_as_it_goes(weights, tmp_path):
    """Each prediction reaches the .jsonl as it is made: the lines appear one by one, not in a buffer's chunks,
    and killed half-way (SIGKILL: no chance to tidy up) the file holds every prediction made, each line a whole
    JSON record. (--accurate: ~0.5 s an image here on one thread, so that the lines come well apart.)"""
    out = tmp_path / "x.jsonl"
    images = [photo(i) for i in range(161, 173)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pipeline.cli", "predict", "--checkpoint", str(weights), "--batch-size", "1",
           "--accurate", "--out", str(out), *images]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = ""  # the file when it first held 3 lines
    try:
        deadline = time.monotonic() + 60  # bounded: a hang fails the test instead of stalling the suite
        while proc.poll() is None and time.monotonic() < deadline:
            text = out.read_text() if out.exists() else ""
            if text.count("\n") >= 3:
                proc.send_signal(signal.SIGKILL)
                seen = text
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert seen and proc.returncode == -signal.SIGKILL, \
        f"not killed while writing (exit {proc.returncode}):\n{err.decode()[-2000:]}"
    # the header and the first records came one at a time (a buffered file shows its first ~9 lines at once)
    assert seen.count("\n") <= 6, f"{seen.count(chr(10))} lines appeared at once"
    text = out.read_text()
    assert text.endswith("\n") and text.startswith(seen)
    lines = text.splitlines()
    head, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert head["joints"] == LSP_JOINTS
    assert 2 <= len(records) < len(images)  # it was stopped before the end
    assert [r["image"] for r in records] == images[:len(records)]
    for r in records:
        kp = np.array(r["keypoints"])
        assert kp.shape == (14, 3) and np.isfinite(kp).all()


def test_boxes_match_inputs_as_paths_and_bad_boxes_are_reported(weights, tmp_path, monkeypatch, capsys):
    from pipeline.inference import FAST, predict_images, read_image
    from pipeline.weights import load_trained

    monkeypatch.chdir(tmp_path)
    shutil.copy(photo(167), tmp_path / "name.jpg")
    shutil.copy(photo(168), tmp_path / "zero.jpg")
    box = [30, 40, 50, 70]
    (tmp_path / "boxes.json").write_text(json.dumps({"./name.jpg": box, "zero.jpg": [12, 15, 0, 0],
                                                     "elsewhere/nowhere.jpg": [0, 0, 50, 50]}))
    assert predict(weights, "--out", "p.json", "--boxes", "boxes.json", "name.jpg", "zero.jpg") == 0
    captured = capsys.readouterr()
    assert "the box of zero.jpg [12, 15, 0, 0] has no area; that image is searched without one" in captured.err
    assert "1 box(es) match no input and are unused: elsewhere/nowhere.jpg" in captured.err
    kps = keypoints_of(tmp_path / "p.json")
    assert list(kps) == ["name.jpg", "zero.jpg"]
    # name.jpg's box was used: its crop's keypoints, which lie in the padded box
    model, record = load_trained(weights)
    images = [read_image(str(tmp_path / n)) for n in ("name.jpg", "zero.jpg")]
    expected = predict_images(model, record.config, images, [box, None], record.flip_permutation(), FAST)
    np.testing.assert_allclose(kps["name.jpg"], expected[0], atol=1e-4)
    kp = kps["name.jpg"]
    side, cx, cy = 1.25 * max(box[2:]), box[0] + box[2] / 2, box[1] + box[3] / 2
    assert (np.abs(kp[:, 0] - cx) <= side / 2 + 1).all() and (np.abs(kp[:, 1] - cy) <= side / 2 + 1).all()
    # zero.jpg was searched as a photo without a box
    np.testing.assert_allclose(kps["zero.jpg"], expected[1], atol=1e-4)


def test_flip_test_changes_predictions_and_no_flip_is_the_plain_pass(weights, tmp_path):
    """Through a --boxes box at one scale (the default search does not flip its first pass): the flip test
    changes the keypoints, and --no-flip is exactly the model on the crop, decoded and mapped back."""
    from pipeline.inference import crop, crop_to_original, predict_crops, read_image
    from pipeline.weights import load_trained

    image_path = photo(170)
    box = [20, 30, 120, 200]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({image_path: box}))
    results = {}
    for flag in ([], ["--no-flip"]):
        out = tmp_path / f"p{len(flag)}.json"
        assert predict(weights, "--out", str(out), "--boxes", str(boxes), "--scales", "1", *flag, image_path) == 0
        results[bool(flag)] = keypoints_of(out)[image_path]
    model, record = load_trained(weights)
    cfg = record.config
    c, m = crop(read_image(image_path), box, cfg.data.input_size, cfg.data.padding)
    kp = predict_crops(model, torch.from_numpy(c[None]), dark_kernel=cfg.eval.dark_kernel)
    xy = crop_to_original(kp[..., :2], torch.from_numpy(m[None]))[0].numpy()
    np.testing.assert_allclose(results[True][:, :2], xy, atol=1e-3)
    np.testing.assert_allclose(results[True][:, 2], kp[0, :, 2].numpy(), atol=1e-5)
    assert not np.allclose(results[False][:, :2], results[True][:, :2])


def test_second_pass_box_is_the_confident_joints_grown_about_their_centre():
    from pipeline.inference import BOX_SCORE, box_from_keypoints

    keypoints = np.array([[10, 20, 1.0], [30, 60, 0.5], [500, 500, BOX_SCORE / 2]], np.float32)  # the last: not confident
    x, y, w, h = box_from_keypoints(keypoints, 1.5)
    assert (w, h) == pytest.approx((30, 60))
    assert (x + w / 2, y + h / 2) == pytest.approx((20, 40))  # the joints' centre stays


def test_one_confident_joint_frames_no_box():
    """A pass that finds one confident joint (or two on the same pixel, or none above zero) frames nothing: None,
    not a division by a zero-size box."""
    from pipeline.inference import BOX_SCORE, box_from_keypoints

    one = np.array([[50, 60, 0.9]] + [[10 * k, 5 * k, BOX_SCORE * 0.9 / 2] for k in range(13)], np.float32)
    for grow in (1.0, 1.4):
        assert box_from_keypoints(one, grow) is None
    same = one.copy()
    same[1] = [50, 60, 0.8]
    assert box_from_keypoints(same) is None
    assert box_from_keypoints(np.array([[1, 2, -0.5], [80, 90, -0.2]], np.float32)) is None
    # and the same joints with a second confident one apart from the first do frame a box
    two = one.copy()
    two[5, 2] = 0.5
    assert box_from_keypoints(two) == pytest.approx([10 * 4, 5 * 4, 50 - 40, 60 - 20])


@pytest.fixture(scope="module")
def one_joint_weights(weights, tmp_path_factory):
    """The untrained model with every heatmap head but the first joint's silenced (zero) and the first's
    lifted: any crop's confident joints are that one joint alone."""
    from pipeline.weights import load_trained, save_weights

    model, record = load_trained(weights)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith("heatmaps.weight")]:
        state[key][1:] = 0
        state[key.replace("weight", "bias")][1:] = 0
        state[key.replace("weight", "bias")][0] += 5
    return save_weights(state, tmp_path_factory.mktemp("one-joint") / "model.safetensors", record)


def test_search_that_finds_one_joint_keeps_the_first_pass(one_joint_weights, tmp_path, capsys):
    from pipeline.inference import FAST, box_from_keypoints, first_pass_boxes, predict_batch, predict_images, read_image
    from pipeline.weights import load_trained

    model, record = load_trained(one_joint_weights)
    cfg = record.config
    image = read_image(photo(171))
    first = predict_batch(model, cfg, [image] * (1 + 9 * len(FAST.windows)), first_pass_boxes(image, FAST.windows),
                          None, FAST.first_scales)
    for kp in first:  # the case: one confident joint a crop
        assert (kp[:, 2] >= 0.1 * kp[:, 2].max()).sum() == 1 and box_from_keypoints(kp, 1.4) is None
    got = predict_images(model, cfg, [image], [None], None, FAST)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, max(first, key=lambda kp: kp[:, 2].mean()), atol=1e-5)
    out = tmp_path / "p.json"
    assert predict(one_joint_weights, "--out", str(out), photo(171)) == 0
    assert np.isfinite(keypoints_of(out)[photo(171)]).all()
    assert "skipped" not in capsys.readouterr().err


def test_bare_photo_passes_follow_the_box_rule(weights):
    """A bare photo: of the whole-photo and window crops (no flip in FAST's first pass), the `keep` (2 here) with
    the highest mean peak are each refined: every later pass crops the previous joints' box grown by `grows`
    (x1.6, then x1.1 here) with the flip test, each exactly as predict_batch gives it; the answer is the refined
    crop with the highest mean peak. A boxed photo keeps its box, at the full test."""
    from pipeline import inference
    from pipeline.weights import load_trained

    model, record = load_trained(weights)
    cfg, flip = record.config, record.flip_permutation()
    images = [inference.read_image(photo(i)) for i in (161, 162)]
    given = [10, 10, 100, 150]
    search = dataclasses.replace(inference.FAST, windows=(0.6,), keep=2, passes=3, grows=(1.6, 1.1))
    got = inference.predict_images(model, cfg, images, [None, given], flip, search)

    def one(box, flip_perm, scales):
        return inference.predict_batch(model, cfg, images[:1], [box], flip_perm, scales)[0]

    def surest(kps):
        return max(kps, key=lambda kp: kp[:, 2].mean())

    windows = inference.first_pass_boxes(images[0], search.windows)
    h, w = images[0].shape[:2]
    assert len(windows) == 1 + 9 * len(search.windows) and windows[0] == [0, 0, w, h]
    first = sorted((one(box, None, search.first_scales) for box in windows), key=lambda kp: -kp[:, 2].mean())
    refined = [one(inference.box_from_keypoints(one(inference.box_from_keypoints(kp, 1.6), flip, search.scales), 1.1),
                   flip, search.scales) for kp in first[:2]]
    np.testing.assert_allclose(got[0], surest(refined), atol=1e-5)
    np.testing.assert_allclose(got[1], inference.predict_batch(model, cfg, images[1:], [given], flip)[0], atol=1e-5)
    # one pass: the surest first-pass crop itself; flipped when the search says so (--accurate)
    np.testing.assert_allclose(inference.predict_images(model, cfg, images[:1], [None], flip, search.with_passes(1))[0],
                               first[0], atol=1e-5)
    flipped = surest([one(box, flip, search.first_scales) for box in windows])
    np.testing.assert_allclose(inference.predict_images(model, cfg, images[:1], [None], flip,
                                                        dataclasses.replace(search, passes=1, first_flip=True))[0],
                               flipped, atol=1e-5)
    assert not np.allclose(flipped, first[0])


def test_first_pass_windows_tile_the_photo():
    """Square windows of each share of the longer side, 3 x 3, from one corner to the other."""
    from pipeline.inference import ACCURATE, first_pass_boxes

    boxes = np.array(first_pass_boxes(np.zeros((200, 400, 3), np.uint8), ACCURATE.windows))
    assert len(boxes) == 1 + 9 * len(ACCURATE.windows)
    side = ACCURATE.windows[0] * 400
    grid = boxes[1:10]
    assert np.allclose(grid[:, 2:], side)
    assert grid[:, 0].min() == pytest.approx(0) and (grid[:, 0] + side).max() == pytest.approx(400)
    # taller than the photo: the windows are centred on it vertically
    assert np.allclose(grid[:, 1] + side / 2, 100)
    assert len(first_pass_boxes(np.zeros((200, 400, 3), np.uint8), ())) == 1  # no windows: the whole photo


def write_video(path, frames: list[np.ndarray], fps: float = 10.0) -> None:
    video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].shape[1::-1])
    assert video.isOpened()
    for frame in frames:
        video.write(frame)
    video.release()


def count_frames(path) -> tuple[int, tuple]:
    capture = cv2.VideoCapture(str(path))
    n, shape = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        n, shape = n + 1, frame.shape
    capture.release()
    return n, shape


def test_video_gives_a_prediction_per_frame_and_an_overlay_video(weights, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    write_video(clip, [cv2.resize(cv2.imread(photo(161 + k)), (160, 120)) for k in range(6)])
    assert count_frames(clip) == (6, (120, 160, 3))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk, not a video " * 64)
    out, overlay = tmp_path / "p.jsonl", tmp_path / "drawn"
    assert predict(weights, "--overlay", str(overlay), "--out", str(out), str(bad), str(clip), photo(175)) == 0
    captured = capsys.readouterr()
    assert f"skipped {bad}: cannot open this video" in captured.err or \
        f"skipped {bad}: no frame could be decoded" in captured.err
    line = summary_line(captured.out)
    assert line.startswith(f"wrote 7 predictions (6 of them video frames) to {out}; overlays in {overlay}; 1 skipped (")
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["joints"] == LSP_JOINTS
    records = [json.loads(line) for line in lines[1:]]
    assert [(r["image"], r.get("frame")) for r in records] == [(str(clip), k) for k in range(6)] + [(photo(175), None)]
    for r in records:
        kp = np.array(r["keypoints"])
        assert kp.shape == (14, 3) and np.isfinite(kp).all()
    assert sorted(p.name for p in overlay.iterdir()) == ["clip.mp4", "im00175.jpg"]
    assert count_frames(overlay / "clip.mp4") == (6, (120, 160, 3))


COCO_FILES = [161, 162, 163, 164]


def coco_annotations(path) -> dict[str, int]:
    """A COCO person-keypoints annotation file for four sample photos (made-up but valid people); -> their ids."""
    from shards.datasets import COCO_JOINTS

    rng = np.random.default_rng(0)
    ids = {f"im{i:05d}.jpg": 9000 + 7 * k for k, i in enumerate(COCO_FILES)}
    images, annotations = [], []
    for k, (name, image_id) in enumerate(ids.items()):
        h, w = cv2.imread(str(SAMPLE / "images" / name)).shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        xy = rng.uniform([0.2 * w, 0.1 * h], [0.8 * w, 0.9 * h], size=(17, 2))
        x0, y0 = xy.min(0)
        x1, y1 = xy.max(0)
        annotations.append({"id": k + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0, "num_keypoints": 17,
                            "keypoints": [round(float(v), 1) for p in xy for v in (*p, 2)],
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                            "area": float((x1 - x0) * (y1 - y0))})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_JOINTS), "skeleton": []}]}))
    return ids


def test_coco_results_carry_the_image_ids_and_pycocotools_scores_them(weights, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from shards.datasets import COCO_JOINTS

    ann = tmp_path / "ann.json"
    ids = coco_annotations(ann)
    inputs = [photo(i) for i in COCO_FILES[:2]] + [photo(180)] + [photo(i) for i in COCO_FILES[2:]]
    out = tmp_path / "r.json"
    assert predict(weights, "--format", "coco", "--coco-ids", str(ann), "--out", str(out), *inputs) == 0
    captured = capsys.readouterr()
    assert f"skipped {photo(180)}: no COCO image id for it" in captured.err
    assert summary_line(captured.out).endswith("; 1 skipped (1 no COCO image id for it)")
    results = json.loads(out.read_text())
    assert isinstance(results, list) and [r["image_id"] for r in results] == list(ids.values())
    # the same numbers as the json format, joints matched by name; the COCO joints the LSP model lacks: zeros
    as_json = tmp_path / "p.json"
    assert predict(weights, "--out", str(as_json), *inputs) == 0
    plain = keypoints_of(as_json)
    lacking = {"nose", "left_eye", "right_eye", "left_ear", "right_ear"}
    assert lacking == set(COCO_JOINTS) - set(LSP_JOINTS)
    for r, i in zip(results, COCO_FILES):
        assert r["category_id"] == 1 and len(r["keypoints"]) == 51 and np.isfinite(r["score"])
        kp = np.array(r["keypoints"]).reshape(17, 3)
        for j, name in enumerate(COCO_JOINTS):
            expected = [0, 0, 0] if name in lacking else plain[photo(i)][LSP_JOINTS.index(name)]
            np.testing.assert_allclose(kp[j], expected, atol=0.006, err_msg=name)
    coco = COCO(str(ann))
    evaluation = COCOeval(coco, coco.loadRes(str(out)), "keypoints")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = np.asarray(evaluation.stats)
    assert stats.shape == (10,) and (np.isfinite(stats) & ((stats == -1) | ((stats >= 0) & (stats <= 1)))).all()


def test_coco_ids_without_coco_format_is_refused(weights, tmp_path, capsys):
    ann = tmp_path / "ann.json"
    coco_annotations(ann)
    assert predict(weights, "--coco-ids", str(ann), "--out", str(tmp_path / "r.json"), photo(161)) == 2
    assert "mshg predict: error: --coco-ids goes with --format coco" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_nothing_predicted_exits_1(weights, tmp_path, capsys):
    bad = [tmp_path / "a.jpg", tmp_path / "b.png"]
    for path in bad:
        path.write_bytes(b"junk")
    out = tmp_path / "p.json"
    assert predict(weights, "--out", str(out), *map(str, bad), str(tmp_path / "missing.jpg")) == 1
    captured = capsys.readouterr()
    assert all(f"skipped {path}: cannot read or decode this image" in captured.err for path in bad)
    assert summary_line(captured.out) == (f"wrote 0 predictions (0 of them video frames) to {out}; 3 skipped "
                                          "(1 no such file or folder, 2 cannot read or decode this image)")
    assert json.loads(out.read_text())["predictions"] == []


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_passes_below_one_is_refused_by_name(command, weights, tmp_path, capsys):
    args = {"predict": ["--out", str(tmp_path / "p.json"), photo(161)],
            "evaluate": ["--shards", str(tmp_path), "--photos", "bare"]}[command]
    with pytest.raises(SystemExit) as exit_:
        mshg([command, "--checkpoint", str(weights), "--passes", "0", *args])
    assert exit_.value.code == 2 and "argument --passes: must be >= 1; got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_by_name(weights, tmp_path, capsys):
    """The same rule as train.device (pipeline.distributed.pick_device), worded for the command's option."""
    assert predict(weights, "--device", "cuda", "--out", str(tmp_path / "p.json"), photo(161)) == 2
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
