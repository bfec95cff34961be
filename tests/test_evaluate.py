"""Evaluation: results mapped back and summarised into the shard set's metric (PCKh, COCO AP through the DALI
validation crop), the photographs read from the tars, `mshg evaluate`'s checks; decoding, the flip test and the
multi-scale test; the bench analyses. The pure metrics are tests/test_metrics.py."""
import numpy as np
import pytest
import torch

from pipeline.cli import main as mshg
from pipeline.data import build_loader, unpack
from shards.format import ShardSet
from pipeline.config import DataConfig
from pipeline.evaluate import SampleResult, summarise
from pipeline.metrics import headline, metric_for
from pipeline.inference import crop_heatmaps, decode_heatmaps
from tests.helpers import rewrite_tar, tar_members
from tests.test_metrics import coco_shards  # noqa: F401 - the fixture

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them

LSP_FLIP = [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13]


def test_side_check_flags_a_mirrored_person_and_writes_its_labels_swapped(tmp_path):
    import scipy.io

    from bench.analyses.side_check import flagged_ids, pair_votes, write_fixed
    pairs = [[0, 5], [1, 4], [2, 3], [6, 11], [7, 10], [8, 9]]
    gt = np.ones((14, 3))
    gt[:, 0], gt[:, 1] = 50.0 * np.arange(14), 300.0
    gt[9, :2], gt[2, :2] = (0, 0), (60, 80)  # torso 100 px
    mirrored = gt[LSP_FLIP]  # every pair predicted on the other side's truth
    one_limb = gt.copy()
    one_limb[11, :2] = gt[6, :2]  # both wrists on the right wrist: a miss, but no whole-person swap
    assert pair_votes(gt, gt, pairs) == (0, 6)
    assert pair_votes(mirrored, gt, pairs) == (6, 0)
    assert pair_votes(one_limb, gt, pairs) == (0, 5)
    no_torso = gt.copy()
    no_torso[9, 2] = 0
    assert pair_votes(mirrored, no_torso, pairs) is None
    results = {3: SampleResult(mirrored, gt, None), 4: SampleResult(one_limb, gt, None),
               5: SampleResult(mirrored, no_torso, None)}
    flagged, histogram = flagged_ids(results, pairs)
    assert flagged == [3] and histogram.tolist() == [1, 0, 0, 0, 0, 0, 1]
    joints = np.random.default_rng(0).uniform(0, 100, (14, 3, 5))
    (tmp_path / "lspet" / "images").mkdir(parents=True)
    scipy.io.savemat(tmp_path / "lspet" / "joints.mat", {"joints": joints})
    write_fixed(str(tmp_path / "lspet"), str(tmp_path / "fixed"), flagged, pairs)
    fixed = scipy.io.loadmat(tmp_path / "fixed" / "joints.mat")["joints"]
    assert np.array_equal(fixed[:, :, 2], joints[LSP_FLIP, :, 2])  # image 3 is column 2
    assert np.array_equal(np.delete(fixed, 2, axis=2), np.delete(joints, 2, axis=2))
    assert (tmp_path / "fixed" / "images").resolve() == (tmp_path / "lspet" / "images").resolve()


def test_pair_redecode_moves_a_double_counted_joint_to_its_second_peak_only():
    import torch

    from bench.analyses.pair_redecode import pair_outcomes, separate_pairs
    maps = torch.zeros(3, 4, 16, 16)  # joints 0/1 a pair, 2/3 a pair
    maps[:, 0, 5, 5], maps[:, 1, 5, 6] = 1.0, 0.8  # both peaks on one spot: joint 1 (lower) is double counted
    maps[0, 1, 12, 12] = 0.5  # image 0: joint 1 has a second peak elsewhere, 0.62 of its own
    maps[1, 1, 12, 12] = 0.1  # image 1: a weak one, 0.12 of its own
    maps[:, 2, 2, 2], maps[:, 3, 2, 10] = 1.0, 1.0  # a pair far apart: left alone
    out = separate_pairs(maps, [(0, 1), (2, 3)], radius=1, alpha=0.5)
    assert out[0, 1].argmax() == 12 * 16 + 12  # re-decoded at its second peak
    assert torch.equal(out[1], maps[1]) and torch.equal(out[2], maps[2])  # too weak / none: kept
    assert torch.equal(out[:, [0, 2, 3]], maps[:, [0, 2, 3]])  # only the lower joint of the close pair changes
    assert separate_pairs(maps, [(0, 1)], radius=0, alpha=0.0)[0, 1].argmax() == 5 * 16 + 6  # 1 cell apart > 0
    gt = np.ones((1, 14, 3))
    gt[..., 0], gt[..., 1] = 50.0 * np.arange(14), 300.0
    gt[0, 9, :2], gt[0, 2, :2] = (0, 0), (60, 80)  # torso 100 px
    pred = gt.copy()
    pred[0, 11, :2] = gt[0, 6, :2]  # both wrists on the right wrist: a double count
    pred[0, 7, :2], pred[0, 10, :2] = gt[0, 10, :2], gt[0, 7, :2]  # the elbows exchanged: a full swap
    pairs = [[0, 5], [1, 4], [2, 3], [6, 11], [7, 10], [8, 9]]
    assert pair_outcomes(pred, gt, pairs) == {"both hit": 4, "double count": 1, "full swap": 1, "other": 0}


def test_evaluate_refuses_shards_whose_joints_differ_by_name_or_order(weights, tmp_path, capsys):
    """Issue 48: only the joint count was checked, so 14 joints in another order scored silently wrong. Now the
    names are compared, and the first difference is named from both lists."""
    import json

    from tests.conftest import shard_sample
    root = shard_sample(tmp_path / "val", 161, 162)
    manifest = json.loads((root / "manifest.json").read_text())
    joints = manifest["joints"]
    joints[0], joints[5] = joints[5], joints[0]  # right_ankle <-> left_ankle: still 14
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert mshg(["evaluate", "--checkpoint", str(weights), "--shards", str(root)]) == 2
    err = capsys.readouterr().err
    assert "joint 0 is 'left_ankle' in the shards but 'right_ankle' in the model" in err, err
    joints[:] = joints[:13]  # one joint fewer: named the same way
    joints[0], joints[5] = joints[5], joints[0]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert mshg(["evaluate", "--checkpoint", str(weights), "--shards", str(root)]) == 2
    assert "13 joints, the model 14: joint 13 is (none) in the shards but 'head_top' in the model" in capsys.readouterr().err


def test_photo_samples_decode_each_photo_and_name_the_tar_and_key_of_a_bad_one(tmp_path):
    import cv2

    from pipeline.evaluate import photo_samples
    from tests.conftest import SAMPLE, shard_sample
    root = shard_sample(tmp_path / "val", 161, 162)
    shards = ShardSet.open(root)
    photos = list(photo_samples(shards))
    assert sorted(p.idx for p in photos) == [161, 162]  # the sample ids: LSPET image numbers
    first = min(photos, key=lambda p: p.idx)
    assert np.array_equal(first.image, cv2.cvtColor(cv2.imread(str(SAMPLE / "images" / "im00161.jpg")), cv2.COLOR_BGR2RGB))
    assert first.keypoints.shape == (14, 3) and len(first.box) == 4
    assert first.meta["idx"] == 161  # its JSON metadata, read with it: `summarise` needs no second pass
    # the same tar with one photo's bytes cut short: an error that says which tar and sample
    tar_path = shards.tars[0]
    bad_key = next(info.name.partition(".")[0] for info, _ in tar_members(tar_path) if info.name.endswith(".jpg"))
    rewrite_tar(tar_path, lambda name, data: data[:20] if name == f"{bad_key}.jpg" else data)
    with pytest.raises(ValueError, match=f"{tar_path}: sample {bad_key}: cannot decode this image"):
        list(photo_samples(shards))


def test_pckh_through_summarise_maps_crops_back_to_original_pixels():
    """MPII results in crop coordinates (zoom 2) are mapped back with their matrix before the
    head-box normalisation (head box in original pixels)."""

    from shards.datasets import MPII_JOINTS

    class Shards:  # the metric finds pelvis and thorax (not in the mean) by name
        dataset, joints, tars, oks_sigmas = "mpii", list(MPII_JOINTS), [], []

    matrix = np.array([[2.0, 0, -50], [0, 2.0, -30]], np.float32)
    gt_orig = np.zeros((16, 3))
    gt_orig[:, :2] = np.arange(32).reshape(16, 2) + 100
    gt_orig[:, 2] = 1
    to_crop = lambda p: np.concatenate([(p[:, :2] + 0.5) * 2 + [-50, -30], p[:, 2:]], 1)
    gt = to_crop(gt_orig)
    pred = gt.copy()
    pred[0, 0] += 2 * 14.0  # 14 original px: correct for head size 30 (threshold 15)
    pred[1, 0] += 2 * 16.0  # 16 original px: wrong; in crop pixels 32 would be "correct" at 2x head size
    results = {7: SampleResult(pred, gt, matrix)}
    m = summarise(results, Shards(), metadata={7: {"head_box": [0, 0, 30, 40]}})
    assert m["metric"] == "pckh" and m["per_joint"][0] == 1.0 and m["per_joint"][1] == 0.0
    assert m["value"] == pytest.approx(13 / 14)
    assert headline(m) == f"PCKh@0.5 = {100 * 13 / 14:.1f}"
    metric = metric_for(Shards())
    tracked = metric.tracked(m)
    assert tracked["pckh"] == m["value"] and tracked[f"pckh/{MPII_JOINTS[1]}"] == 0.0
    assert "(not in the mean)" in metric.format(m).splitlines()[7]


def test_decode_argmax_and_quarter_offset():
    hm = torch.zeros(1, 2, 8, 8)
    hm[0, 0, 3, 5] = 1.0
    hm[0, 0, 3, 6] = 0.5  # right neighbour higher than the left one: +0.25 in x
    hm[0, 0, 2, 5] = 0.2  # upper neighbour higher: -0.25 in y
    hm[0, 1, 0, 0] = 1.0  # at the border: no shift
    out = decode_heatmaps(hm, stride=4)
    assert out[0, 0].tolist() == pytest.approx([(5 + 0.25 + 0.5) * 4, (3 - 0.25 + 0.5) * 4, 1.0])
    assert out[0, 1].tolist() == pytest.approx([0.5 * 4, 0.5 * 4, 1.0])


def test_flip_test_is_left_right_consistent():
    """For a mirror-symmetric image, the flip-tested heatmaps of any model are their own mirror with
    left/right joints swapped; a plain forward pass is not. Also: mirrored heatmaps decode to x -> S - x."""
    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=8, stages=[[2, 1], [4, 1]]), 14, 32).eval()
    half = torch.randint(0, 256, (1, 32, 16, 3), dtype=torch.uint8)
    image = torch.cat([half, torch.flip(half, dims=[2])], 2)  # symmetric about the vertical axis
    plain, stride = crop_heatmaps(model, image)
    tested, _ = crop_heatmaps(model, image, flip_perm=LSP_FLIP)
    assert stride == 4
    mirror = lambda h: torch.flip(h, dims=[3])[:, LSP_FLIP]
    torch.testing.assert_close(mirror(tested), tested, atol=1e-6, rtol=0)
    assert (mirror(plain) - plain).abs().max() > 1e-3
    a, b = decode_heatmaps(plain, 4), decode_heatmaps(mirror(plain), 4)  # (no ties in a non-symmetric map)
    np.testing.assert_allclose(b[0, :, 0].numpy(), 32 - a[0, LSP_FLIP, 0].numpy(), atol=1e-5)


class BlobModel(torch.nn.Module):
    """A stand-in whose two joints' heatmaps are the red channel, pooled to stride 4: the peak is where the
    image's red blob is, so the multi-scale test's geometry can be checked without training."""
    strides = [4]

    def forward(self, x):
        red = torch.nn.functional.avg_pool2d(x[:, :1], 4)
        return [torch.cat([red, red], 1)]


def test_multi_scale_test_maps_each_zoom_back_onto_the_crop():
    """A red blob off the centre of a 96-px crop (at 70, 30): every zoom (0.8: tighter, 1.25: wider) moves it
    in the zoomed crop (to ~75.5, ~24.5 and ~65.6, ~33.6), and its heatmaps zoomed back put it where it is in
    the crop, alone and averaged; zooming back by the factor instead of its inverse would not."""
    from pipeline.inference import zoom

    yy, xx = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(96) + 0.5, indexing="ij")
    blob = 255 * torch.exp(-((xx - 70) ** 2 + (yy - 30) ** 2) / (2 * 4.0 ** 2))
    image = torch.stack([blob, torch.zeros_like(blob), torch.zeros_like(blob)], -1).round().to(torch.uint8)[None]
    model = BlobModel()
    for scales in ([1.0], [0.8], [1.25], [0.8, 1.0, 1.25]):
        heatmaps, stride = crop_heatmaps(model, image, scales=scales)
        xy = decode_heatmaps(heatmaps, stride)[0, 0, :2]
        assert (xy - torch.tensor([70.0, 30.0])).abs().max() <= 1.5, (scales, xy)
    zoomed = zoom(image.permute(0, 3, 1, 2).float(), 0.8)  # the blob as the 0.8 pass sees it
    wrong = zoom(torch.nn.functional.avg_pool2d(zoomed[:, :1], 4), 0.8)  # zoomed back the wrong way
    assert (decode_heatmaps(wrong, 4)[0, 0, :2] - torch.tensor([70.0, 30.0])).abs().max() > 5


def test_eval_scales_are_checked_and_cli_flags_override_them(weights, tmp_path, capsys, monkeypatch):
    """eval.scales is checked as a key=value override and as `mshg evaluate --scales`; the flag replaces the
    run's eval.scales ([1.0] here) for the evaluation: the crops reach the model at each zoom it names, the
    printed settings name them, and the keypoints and the metric are the multi-scale test's, not one scale's."""
    import json

    from pipeline import evaluate
    from pipeline.config import ConfigError, load_config
    from tests.conftest import shard_sample

    assert load_config(None, ["eval.scales=[0.9,1,1.15]"]).eval.scales == [0.9, 1.0, 1.15]
    for bad in ("[]", "[0]", "[1,8]"):
        with pytest.raises(ConfigError, match="eval.scales must list one or more zoom factors"):
            load_config(None, [f"eval.scales={bad}"])
    with pytest.raises(SystemExit):
        mshg(["evaluate", "--checkpoint", "x", "--shards", "y", "--scales", "0.9,big"])
    assert "expected zoom factors such as 0.9,1,1.15; got '0.9,big'" in capsys.readouterr().err

    root = shard_sample(tmp_path / "val", 161, 164)
    calls = []  # (the scales the crops were predicted at, the keypoints) of each batch
    real = evaluate.predict_crops

    def recording(*args, **kwargs):
        pred = real(*args, **kwargs)
        calls.append((list(args[5] if len(args) > 5 else kwargs.get("scales", [1.0])), pred))
        return pred

    monkeypatch.setattr(evaluate, "predict_crops", recording)
    runs = {}
    for scales, shown in ((None, "one scale"), ("0.8,1,1.25", "zooms 0.8, 1, 1.25")):
        calls.clear()
        out = tmp_path / "metrics.json"
        assert mshg(["evaluate", "--checkpoint", str(weights), "--shards", str(root), "--no-flip", "--out", str(out),
                     *(["--scales", scales] if scales else [])]) == 0
        assert f"(the validation crops; flip test off, {shown}, " in capsys.readouterr().out
        assert calls and all(s == ([1.0] if scales is None else [0.8, 1.0, 1.25]) for s, _ in calls), calls
        runs[scales] = torch.cat([pred for _, pred in calls]), json.loads(out.read_text())
    (one, one_metrics), (multi, multi_metrics) = runs.values()
    assert one.shape == multi.shape == (4, 14, 3)
    assert (multi[..., :2] - one[..., :2]).abs().max() > 0.1  # other heatmaps: other keypoints
    assert multi_metrics["per_joint"] != one_metrics["per_joint"] or multi_metrics["value"] != one_metrics["value"]
    # the flag goes through the config's check, as the key=value override does
    assert mshg(["evaluate", "--checkpoint", str(weights), "--shards", str(root), "--scales", "0.1"]) == 2
    assert "eval.scales must list one or more zoom factors" in capsys.readouterr().err


def test_coco_ap_through_the_dali_validation_crop(coco_shards):
    """Ground truth as it leaves the DALI crop, used as the prediction: mapped back to original
    pixels by summarise, COCO AP is 1.0, so crop and mapping agree with pycocotools' ground truth."""
    results = {}
    for batch in build_loader(coco_shards, DataConfig(input_size=64, num_threads=1), 16, train=False):
        b = unpack(batch, torch.device("cpu"))
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            kp = b["keypoints"][i].numpy().copy()
            pred = kp.copy()
            pred[:, 2] = 1.0
            results[sid] = SampleResult(pred, kp, b["matrix"][i].numpy())
    m = summarise(results, coco_shards)
    assert m["metric"] == "coco/AP" and m["samples"] == coco_shards.num_samples
    assert m["value"] == pytest.approx(1.0, abs=1e-6)
    assert headline(m) == "COCO AP = 100.0"
    assert set(metric_for(coco_shards).tracked(m)) >= {"coco/AP", "coco/AP50", "coco/AR"}


