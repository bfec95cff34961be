"""The pure metrics (pipeline/metrics.py) against hand-computed cases and the official MPII formulation; COCO AP
through pycocotools on the real COCO mini sample; the metric classes: which one a shard set gets, their names,
labels, tracked parts and text."""
import io
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.cli import main as mshg
from pipeline.metrics import (METRICS, PCK, TRACKED_NAMES, CocoAP, PCKh, coco_keypoint_eval, headline, metric_for,
                              pck, pckh)
from shards.datasets import LSP_JOINTS, MPII_JOINTS
from shards.format import ShardSet, read_metadata
from tests.conftest import SHARED_DATA
from tests.helpers import tar_members

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them

COCO_MINI = SHARED_DATA / "coco_mini"
LSP_FLIP = [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13]


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory):
    if not COCO_MINI.is_dir():
        pytest.skip(f"{COCO_MINI} not present")
    out = tmp_path_factory.mktemp("coco") / "val"
    assert mshg(["shard", "coco", "--images", str(COCO_MINI / "val2017"), "--annotations",
                 str(COCO_MINI / "annotations" / "person_keypoints_val2017.json"), "--out", str(out), "--quiet"]) == 0
    return ShardSet.open(out)


def shard_truth(shards):
    return {info.name.split(".")[0]: np.load(io.BytesIO(data))
            for tar in shards.tars for info, data in tar_members(tar) if info.name.endswith(".kp.npy")}


def test_pck_hand_computed():
    # LSP torso: left shoulder (9) to right hip (2); person 0 torso 100 px -> threshold 20 px
    gt = np.zeros((3, 14, 3))
    gt[..., 2] = 1
    gt[0, 9, :2], gt[0, 2, :2] = (0, 0), (60, 80)
    gt[1, 9, :2], gt[1, 2, :2] = (0, 0), (0, 50)  # torso 50 -> threshold 10
    gt[2, 9, 2] = 0  # no left shoulder: left out
    pred = gt.copy()
    pred[0, 0, 0] += 20.0  # == 0.2 x torso: correct (<=)
    pred[0, 1, 0] += 20.5  # just over: wrong
    pred[1, 3, 1] += 10.5  # wrong
    gt[1, 4, 2] = 0  # unlabelled: not counted whatever the prediction
    pred[1, 4, :2] += 1000
    m = pck(pred, gt)
    assert m["persons"] == 2 and m["left_out"] == 1
    assert m["pck"] == pytest.approx((28 - 1 - 2) / 27)  # 27 labelled joints, 2 wrong
    assert m["per_joint"][0] == 1.0 and m["per_joint"][1] == 0.5 and m["per_joint"][3] == 0.5
    assert m["per_joint"][4] == 1.0  # one labelled, correct


def test_error_bands_count_a_left_right_swap_and_agree_with_pck():
    from bench.analyses.error_bands import bands
    gt = np.ones((4, 14, 3))
    gt[..., 0], gt[..., 1] = 50.0 * np.arange(14), 300.0  # joints 50 px apart: no mirror within 0.2
    gt[:, 9, :2], gt[:, 2, :2] = (0, 0), (60, 80)  # torso 100 px: 0.2 = 20 px
    pred = gt.copy()
    pred[0, 6, :2] = gt[0, 11, :2] + 5  # right wrist predicted on the left wrist: a swapped miss
    pred[1, 0, 1] += 25  # a near miss (0.25): in the 0.3 band, no swap
    pred[2, 7, 1] += 45  # a miss between 0.3 and 0.5
    gt[3, 6, 2] = 0  # unlabelled: not scored
    out = bands(pred, gt, LSP_FLIP)
    assert out["swapped"][6] == pytest.approx(1 / 3) and out["swapped"].sum() == pytest.approx(1 / 3)
    assert out["0.2"][0] == pytest.approx(0.75) and out["0.3"][0] == 1.0
    assert out["0.3"][7] == pytest.approx(0.75) and out["0.5"][7] == 1.0
    weights = out["count"] / out["count"].sum()
    assert (out["0.2"] * weights).sum() == pytest.approx(pck(pred, gt)["pck"])


def test_pckh_official_head_normalisation_and_mean():
    # head box 30 x 40: diagonal 50, head size 0.6 * 50 = 30, PCKh@0.5 threshold 15 px
    gt = np.zeros((3, 16, 3))
    gt[..., 2] = 1
    heads = np.array([[10, 20, 30, 40], [0, 0, 30, 40], [np.nan] * 4])
    pred = gt.copy()
    pred[0, 0, 0] += 15.0  # == threshold: correct (the official script uses <=)
    pred[0, 1, 1] += 15.01  # wrong
    pred[1, 10, :2] += (9.0, 12.0)  # distance 15: correct
    pred[1, 11, :2] += (9.0, 12.1)  # wrong
    pred[0, 6, 0] += 100  # pelvis wrong: in its per-joint value, not in the mean
    pred[1, 7, 0] += 100  # thorax wrong: likewise
    gt[1, 15, 2] = 0  # unlabelled
    pred[1, 15, :2] += 1000
    m = pckh(pred, gt, heads)
    assert m["persons"] == 2 and m["left_out"] == 1
    assert m["per_joint"][0] == 1.0 and m["per_joint"][1] == 0.5 and m["per_joint"][11] == 0.5
    assert m["per_joint"][6] == 0.5 and m["per_joint"][7] == 0.5 and m["per_joint"][15] == 1.0
    # mean over the 14 joints other than pelvis/thorax, weighted by labelled counts: 27 labelled, 2 wrong
    assert m["pckh"] == pytest.approx(25 / 27)
    # scaling the whole scene scales head size and errors alike
    assert pckh(pred * [3, 3, 1], gt * [3, 3, 1], heads * 3)["pckh"] == pytest.approx(m["pckh"])


def test_coco_ap_is_one_from_ground_truth_and_drops_when_perturbed(coco_shards):
    metas = read_metadata(coco_shards)
    ids = sorted(metas)
    truth = shard_truth(coco_shards)
    gt = np.stack([truth[metas[i]["key"]] for i in ids]).astype(np.float64)
    assert len(ids) == coco_shards.num_samples > 50
    perfect = gt.copy()
    perfect[..., 2] = 1.0
    m = coco_keypoint_eval(perfect, gt, [metas[i] for i in ids], coco_shards.joints)
    assert m["ap"] == pytest.approx(1.0) and m["stats"]["AR"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    aps = []
    for noise in (0.05, 0.15, 0.4):  # a fraction of each person's sqrt(area)
        noisy = perfect.copy()
        scale = np.sqrt([metas[i]["area"] for i in ids])[:, None, None]
        noisy[..., :2] += rng.normal(size=noisy[..., :2].shape) * noise * scale
        aps.append(coco_keypoint_eval(noisy, gt, [metas[i] for i in ids], coco_shards.joints)["ap"])
    assert 1.0 > aps[0] > aps[1] > aps[2] >= 0.0, aps


def test_pckh_equals_the_official_array_formulation_on_random_data():
    """The official evaluation (MATLAB evalMPII, and its NumPy port in HRNet/stacked-hourglass code)
    works on (J, 2, N) arrays with headboxes_src (2, 2, N) as corners: per-joint PCKh =
    sum(visible & err / (0.6 * ||corner2 - corner1||) <= 0.5) / count, and the mean masks joints 6:8
    and weights the others by count. Written here in that layout, independently of `pckh`."""
    rng = np.random.default_rng(1)
    n = 300
    gt = np.concatenate([rng.uniform(0, 500, (n, 16, 2)), (rng.random((n, 16, 1)) > 0.2)], -1).astype(float)
    pred = gt.copy()
    pred[..., :2] += rng.normal(scale=12.0, size=(n, 16, 2))
    corner1 = rng.uniform(0, 400, (n, 2))
    heads = np.concatenate([corner1, rng.uniform(10, 60, (n, 2))], 1)  # x0, y0, w, h
    # the official layout
    pos_pred, pos_gt = pred[..., :2].transpose(1, 2, 0), gt[..., :2].transpose(1, 2, 0)  # (16, 2, N)
    visible = gt[..., 2].T  # (16, N)
    headboxes = np.stack([corner1, corner1 + heads[:, 2:]]).transpose(0, 2, 1)  # (2, 2, N)
    headsizes = 0.6 * np.linalg.norm(headboxes[1] - headboxes[0], axis=0)
    scaled = np.linalg.norm(pos_pred - pos_gt, axis=1) / headsizes * visible
    count = visible.sum(1)
    official = 100.0 * ((scaled <= 0.5) * visible).sum(1) / count
    keep = np.ones(16, bool)
    keep[6:8] = False
    official_mean = (official[keep] * count[keep] / count[keep].sum()).sum()
    m = pckh(pred, gt, heads)
    np.testing.assert_allclose(100 * np.array(m["per_joint"]), official, atol=1e-9)
    assert 100 * m["pckh"] == pytest.approx(official_mean, abs=1e-9)
    assert 20 < official_mean < 95  # a discriminating case, not all-or-nothing


def shard_set(dataset: str, joints, oks_sigmas=()):
    return SimpleNamespace(dataset=dataset, joints=list(joints), oks_sigmas=list(oks_sigmas))


def test_each_shard_set_gets_one_metric_by_its_dataset_and_sigmas():
    """The one choice of the metric (it was guessed from the dataset name in five places, and track.py kept its
    own list of names): named datasets first, then any set with OKS sigmas, else PCK."""
    assert type(metric_for(shard_set("lspet", LSP_JOINTS))) is PCK
    assert type(metric_for(shard_set("LSP", LSP_JOINTS))) is PCK
    assert type(metric_for(shard_set("mpii", MPII_JOINTS))) is PCKh
    assert type(metric_for(shard_set("coco", [f"j{i}" for i in range(17)]))) is CocoAP
    assert type(metric_for(shard_set("crowdpose", LSP_JOINTS, [0.1] * 14))) is CocoAP
    assert type(metric_for(shard_set("mine", LSP_JOINTS))) is PCK
    assert TRACKED_NAMES == tuple(kind.name for kind in METRICS) == ("pck", "pckh", "coco/AP")
    assert [kind.label for kind in METRICS] == ["PCK@0.2", "PCKh@0.5", "COCO AP"]
    with pytest.raises(ValueError, match=r"PCK's torso needs joints \['left_shoulder', 'right_hip'\]"):
        metric_for(shard_set("mine", [j for j in LSP_JOINTS if j != "right_hip"]))
    with pytest.raises(ValueError, match="PCKh's mean needs joints"):
        metric_for(shard_set("mpii", LSP_JOINTS))


def test_a_metric_names_tracks_and_prints_its_result():
    gt = np.zeros((2, 14, 3))
    gt[..., 2] = 1
    gt[:, 9, :2], gt[:, 2, :2] = (0, 0), (60, 80)  # torso 100 px
    pred = gt.copy()
    pred[0, 0, 0] += 30  # one miss of 28
    metric = metric_for(shard_set("lspet", LSP_JOINTS))
    result = {**metric.compute(pred, gt), "samples": 2}
    assert result["metric"] == "pck" and result["value"] == pytest.approx(27 / 28) == result["pck"]
    assert headline(result) == metric.headline(result) == f"PCK@0.2 = {100 * 27 / 28:.1f}"
    tracked = metric.tracked(result)
    assert tracked["pck"] == result["value"] and tracked[f"pck/{LSP_JOINTS[0]}"] == 0.5 and len(tracked) == 15
    lines = metric.format(result).splitlines()
    assert lines[0] == f"PCK@0.2 = {100 * 27 / 28:.1f}  (2 persons, 0 left out without both torso joints, 2 samples)"
    assert lines[1].split() == [f"{LSP_JOINTS[0]}:", "50.0"] and len(lines) == 15
