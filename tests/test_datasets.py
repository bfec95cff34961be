"""Any COCO-format keypoint set (CrowdPose 14 joints, MHP 16, COCO 17), MPII, and training on a weighted
mix of datasets with different joint sets. Real fixtures (tests/fixtures, copied from the team's
pose_fixtures), through the sharder, `mshg verify`, DALI and the trainer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as mshg
from tests.conftest import REPO, SHARED_DATA, tiny_config

FIXTURES = REPO / "tests" / "fixtures"


def shard_coco(out: Path, name: str, annotations: Path, images: Path, *extra: str) -> int:
    return mshg(["shard", "coco", "--images", str(images), "--annotations", str(annotations), "--out", str(out),
                 "--name", name, "--quiet", *extra])


def annotated_persons(annotations: Path, min_keypoints: int = 1) -> dict[int, np.ndarray]:
    data = json.loads(annotations.read_text())
    return {a["id"]: np.asarray(a["keypoints"], np.float64).reshape(-1, 3) for a in data["annotations"]
            if not a.get("iscrowd") and (np.asarray(a["keypoints"])[2::3] > 0).sum() >= min_keypoints}


@pytest.mark.parametrize("name,folder,joints,pairs", [
    ("crowdpose", "crowdpose", 14, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]),
    ("mhp", "mhp", 16, [[0, 5], [1, 4], [2, 3], [10, 15], [11, 14], [12, 13]]),
])
def test_coco_format_sets_shard_verify_and_read_back(name, folder, joints, pairs, tmp_path, capsys):
    from pipeline.config import DataConfig
    from pipeline.data import build_loader, unpack
    from shards.format import ShardSet
    from pipeline.inference import crop_to_original

    annotations = next((FIXTURES / folder).glob("*.json"))
    out = tmp_path / name
    assert shard_coco(out, name, annotations, FIXTURES / folder) == 0
    assert mshg(["verify", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == name and len(manifest["joints"]) == joints and manifest["flip_pairs"] == pairs
    assert manifest["skeleton"] and len(manifest["oks_sigmas"]) == joints
    expected = annotated_persons(annotations)
    assert manifest["num_samples"] == len(expected)
    capsys.readouterr()
    # the validation crop's keypoints map back to the annotation (labelled joints, 0-based pixels)
    shards = ShardSet.open(out)
    seen = 0
    for batch in build_loader(shards, DataConfig(train_shards=str(out), input_size=128, num_threads=1), 4, train=False):
        b = unpack(batch, torch.device("cpu"))
        back = crop_to_original(b["keypoints"][..., :2], b["matrix"]).numpy()
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            truth = expected[sid]
            labelled = truth[:, 2] > 0
            np.testing.assert_allclose(back[i][labelled], truth[labelled, :2], atol=1e-3)
            seen += 1
    assert seen == len(expected)


def test_flipped_crop_swaps_left_and_right_by_the_manifest(tmp_path):
    """flip_prob=1: in the mirrored crop, after the relabelling with the pairs derived from CrowdPose's
    names, the left wrist is where the mirrored right wrist is."""
    from pipeline.config import DataConfig
    from pipeline.data import build_loader, unpack
    from shards.format import ShardSet
    from pipeline.targets import swap_flipped

    out = tmp_path / "cp"
    assert shard_coco(out, "crowdpose", FIXTURES / "crowdpose" / "test_crowdpose.json", FIXTURES / "crowdpose") == 0
    shards = ShardSet.open(out)
    common = dict(train_shards=str(out), input_size=128, num_threads=1, scale_range=[1.0, 1.0], rotation_prob=0.0,
                  color_jitter=0.0, shuffle_buffer=1)
    plain = unpack(next(iter(build_loader(shards, DataConfig(**common, flip_prob=0.0), 8, train=True))), torch.device("cpu"))
    flipped = unpack(next(iter(build_loader(shards, DataConfig(**common, flip_prob=1.0), 8, train=True))), torch.device("cpu"))
    assert torch.equal(plain["sample_id"], flipped["sample_id"]) and bool((flipped["flip"] > 0.5).all())
    relabelled = swap_flipped(flipped["keypoints"], flipped["flip"], shards.flip_permutation())
    perm = shards.flip_permutation()
    left_wrist, right_wrist = shards.joints.index("left_wrist"), shards.joints.index("right_wrist")
    assert perm[left_wrist] == right_wrist
    mirrored_x = 128 - plain["keypoints"][..., 0]  # x -> S - x in continuous crop coordinates
    both = (plain["keypoints"][:, left_wrist, 2] > 0) & (plain["keypoints"][:, right_wrist, 2] > 0)
    assert both.any()
    # the mirrored right wrist is the flipped person's left wrist (and the other way round)
    torch.testing.assert_close(relabelled[both][:, left_wrist, 0], mirrored_x[both][:, right_wrist], atol=1e-3, rtol=0)
    torch.testing.assert_close(relabelled[both][:, left_wrist, 1], plain["keypoints"][both][:, right_wrist, 1],
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(relabelled[both][:, right_wrist, 0], mirrored_x[both][:, left_wrist], atol=1e-3, rtol=0)


def test_nothing_usable_or_too_many_problems_is_a_failure(tmp_path, capsys):
    annotations = FIXTURES / "crowdpose" / "test_crowdpose.json"
    assert shard_coco(tmp_path / "none", "crowdpose", annotations, FIXTURES / "crowdpose", "--min-keypoints", "99") == 1
    err = capsys.readouterr().err
    assert "wrote 0 samples" in err
    assert json.loads((tmp_path / "none" / "manifest.json").read_text())["num_skipped"] > 0  # the report stays
    # half the persons with a wrong number of keypoint values: a problem, not a convention
    data = json.loads(annotations.read_text())
    for a in data["annotations"][::2]:
        a["keypoints"] = a["keypoints"][:-3]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    assert shard_coco(tmp_path / "half", "crowdpose", broken, FIXTURES / "crowdpose") == 1
    assert "skipped for a problem, more than --max-skipped 0.2" in capsys.readouterr().err
    assert shard_coco(tmp_path / "half2", "crowdpose", broken, FIXTURES / "crowdpose", "--max-skipped", "0.9") == 0


def test_file_names_with_folders_and_given_flip_pairs_and_sigmas(tmp_path, capsys):
    data = json.loads((FIXTURES / "mhp" / "test_mhp.json").read_text())
    for im in data["images"]:
        im["file_name"] = f"mhp/train/{im['file_name']}"  # a split prefix the folder layout does not have
    ann = tmp_path / "mhp.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "mhp"
    sigmas = ",".join(["0.05"] * 16)
    assert shard_coco(out, "mhp", ann, FIXTURES / "mhp", "--flip-pairs", "Right-ankle:Left-ankle,1:4",
                      "--oks-sigmas", sigmas) == 0
    manifest = json.loads(out.joinpath("manifest.json").read_text())
    assert manifest["num_samples"] == len(data["annotations"]) and not manifest.get("missing_images")
    assert manifest["flip_pairs"] == [[0, 5], [1, 4]] and manifest["oks_sigmas"] == [0.05] * 16
    assert shard_coco(tmp_path / "x", "mhp", ann, FIXTURES / "mhp", "--flip-pairs", "Right-ankle:Nose") == 2
    assert "--flip-pairs" in capsys.readouterr().err


def test_oks_ap_of_a_coco_format_set_uses_its_own_sigmas(tmp_path):
    """CrowdPose's ground truth as the prediction through the validation crop: AP 1.0 with its 14
    joints (COCO's evaluation needed 17 before)."""
    from pipeline.config import DataConfig
    from pipeline.data import build_loader, unpack
    from shards.format import ShardSet
    from pipeline.evaluate import SampleResult, summarise

    out = tmp_path / "cp"
    assert shard_coco(out, "crowdpose", FIXTURES / "crowdpose" / "test_crowdpose.json", FIXTURES / "crowdpose") == 0
    shards = ShardSet.open(out)
    results = {}
    for batch in build_loader(shards, DataConfig(train_shards=str(out), input_size=64, num_threads=1), 4, train=False):
        b = unpack(batch, torch.device("cpu"))
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            kp = b["keypoints"][i].numpy()
            results[sid] = SampleResult(np.concatenate([kp[:, :2], np.ones((len(kp), 1))], 1), kp, b["matrix"][i].numpy())
    m = summarise(results, shards)
    assert m["metric"] == "coco/AP" and m["value"] == pytest.approx(1.0, abs=1e-6)


def test_mpii_fixture_and_coco_mini_shard_and_verify(tmp_path):
    assert mshg(["shard", "mpii", "--images", str(FIXTURES / "mpii"), "--annotations",
                 str(FIXTURES / "mpii" / "test_mpii.json"), "--out", str(tmp_path / "mpii"), "--quiet"]) == 0
    assert mshg(["verify", str(tmp_path / "mpii"), "--quiet"]) == 0
    coco = SHARED_DATA / "coco_mini"
    if not coco.is_dir():
        pytest.skip(f"{coco} not present (the MPII part ran)")
    assert mshg(["shard", "coco", "--images", str(coco / "val2017"), "--annotations",
                 str(coco / "annotations" / "person_keypoints_val2017.json"), "--out", str(tmp_path / "coco"),
                 "--quiet"]) == 0
    assert mshg(["verify", str(tmp_path / "coco"), "--quiet"]) == 0


def test_a_joint_name_in_neither_set_is_refused_before_any_rank_starts(lspet_shards, mpii_shards, tmp_path, capsys):
    """(Training on the mix itself: the shared two-rank run, tests/test_train.py and tests/test_resume.py.)"""
    bad = tiny_config(tmp_path, lspet_shards, data={"extra_sets": [{"shards": str(mpii_shards), "joints": {"neck": "chin"}}]})
    assert mshg(["train", "--ranks", "2", "--config", str(bad)]) == 2
    assert "['chin']" in capsys.readouterr().err


def test_mixed_batches_map_joints_and_leave_the_rest_unlabelled(lspet_shards, mpii_shards):
    from pipeline.config import DataConfig
    from pipeline.data import MixedBatches, TrainBatches
    from pipeline.inputs import joint_map
    from shards.format import ShardSet

    lsp, mp = ShardSet.open(lspet_shards["train"]), ShardSet.open(mpii_shards)
    cfg = DataConfig(train_shards=str(lspet_shards["train"]), input_size=64, num_threads=1, shuffle_buffer=4)
    m = joint_map(lsp.joints, mp.joints, {"neck": "upper_neck"}, "test")
    assert m[lsp.joints.index("neck")] == mp.joints.index("upper_neck") and -1 not in m
    assert joint_map(lsp.joints, [j for j in mp.joints if j != "head_top"], {}, "test")[lsp.joints.index("head_top")] == -1
    no_head = list(m)
    no_head[lsp.joints.index("head_top")] = -1  # as for a set without a head-top joint
    mixed = MixedBatches([TrainBatches(lsp, cfg, 3), TrainBatches(mp, cfg, 1)],
                         [None, no_head], torch.device("cpu"))
    batch = mixed.next()
    assert batch["keypoints"].shape == (4, 14, 3) and batch["image"].shape[0] == 4
    assert batch["keypoints"][3, lsp.joints.index("head_top")].tolist() == [0.0, 0.0, 0.0]  # unlabelled
    state = mixed.state_dict()
    assert [s["drawn"] for s in state["sets"]] == [1, 1]


def test_joints_from_the_field_whose_length_matches_the_category(tmp_path, capsys):
    """A file whose category lists N joints while `keypoints` holds fewer and another field holds N (as
    COCO-WholeBody-style sets do): the matching field is taken and named; --keypoints-field chooses."""
    source = next((FIXTURES / "crowdpose").glob("*.json"))
    data = json.loads(source.read_text())
    for ann in data["annotations"]:
        ann["keypoints_14"], ann["keypoints"] = ann["keypoints"], ann["keypoints"][:12 * 3]  # 12 of 14 joints
    annotations = tmp_path / "wholebody_style.json"
    annotations.write_text(json.dumps(data))
    expected = annotated_persons(source)
    capsys.readouterr()
    assert shard_coco(tmp_path / "auto", "crowdpose", annotations, FIXTURES / "crowdpose") == 0
    assert "joints read from field 'keypoints_14'" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert manifest["num_samples"] == len(expected) and manifest["keypoints_field"] == "keypoints_14"
    # asked for the short field: every person is skipped for its joint count, named, and the command fails
    assert shard_coco(tmp_path / "short", "crowdpose", annotations, FIXTURES / "crowdpose",
                      "--keypoints-field", "keypoints") == 1
    assert "wrong joint count" in capsys.readouterr().out
