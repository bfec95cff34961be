"""The DALI pipeline on real shards of the embedded LSPET sample (CPU-only DALI, no mocks).

Source truth comes from outside the pipeline: joints.mat read with scipy, images decoded with PIL,
matrices built in numpy (`augment_matrix`), crops made with OpenCV."""
import dataclasses
import hashlib
import io
import json
import tarfile

import cv2
import numpy as np
import pytest
import scipy.io
import torch
import webdataset as wds
from PIL import Image
from wds2idx import IndexCreator

from pipeline.cli import main as mshg
from pipeline.config import DataConfig
from pipeline.data import BadSampleError, build_loader, unpack
from pipeline.inputs import augment_matrix, crop_matrix
from shards.format import ShardSet
from pipeline.inference import crop_to_original
from pipeline.targets import make_targets, swap_flipped
from tests.conftest import SAMPLE, shard_sample
from tests.helpers import tar_members

JOINTS = scipy.io.loadmat(SAMPLE / "joints.mat")["joints"]  # (14, 3, 200); column i is im{i+1:05d}
FIXED = dict(color_jitter=0.0, num_threads=1)  # colour off where pixels are compared with the source


def read_all(shards, cfg, train, rank=0, world=1, batch=8, epochs=1):
    loader = build_loader(shards, cfg, batch, train, (rank, world))
    return [[unpack(b, torch.device("cpu")) for b in loader] for _ in range(epochs)] if epochs > 1 else \
        [unpack(b, torch.device("cpu")) for b in loader]


def source_image(sample_id: int) -> np.ndarray:
    return np.asarray(Image.open(SAMPLE / "images" / f"im{sample_id:05d}.jpg").convert("RGB"))


def tight_box(sample_id: int) -> np.ndarray:
    kp = JOINTS[:, :, sample_id - 1]
    xy = kp[kp[:, 2] > 0, :2]
    return np.array([xy[:, 0].min(), xy[:, 1].min(), np.ptp(xy[:, 0]), np.ptp(xy[:, 1])])


def bilinear(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """RGB at continuous coordinates (pixel i covers [i, i+1)), as OpenCV interpolates."""
    patch = cv2.getRectSubPix(image.astype(np.float32), (1, 1), (float(x) - 0.5, float(y) - 0.5))
    return patch[0, 0]


def opencv_crop(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    m = matrix.astype(np.float64).copy()
    m[:, 2] += m[:, :2].sum(1) * 0.5 - 0.5  # OpenCV samples at integer pixel centres
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def lr_pairs(joints: list[str]) -> list[tuple[int, int]]:
    """(right, left) index pairs found from the joint names alone, not from the manifest's flip_pairs."""
    return [(i, joints.index(n.replace("right", "left"))) for i, n in enumerate(joints) if n.startswith("right")]


def test_validation_crop_keypoints_map_back_to_joints_mat(lspet_shards):
    shards = ShardSet.open(lspet_shards["val"])
    cfg = DataConfig(input_size=128, num_threads=1)
    seen = []
    for b in read_all(shards, cfg, train=False):
        assert b["image"].shape[1:] == (128, 128, 3) and b["image"].dtype == torch.uint8
        assert torch.all(b["flip"] == 0)
        back = crop_to_original(b["keypoints"][..., :2], b["matrix"]).numpy()
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            truth = JOINTS[:, :, sid - 1]  # LSPET sample ids are the image numbers
            labelled = truth[:, 2] > 0
            assert np.array_equal(b["keypoints"][i, :, 2].numpy() > 0, labelled)
            np.testing.assert_allclose(back[i][labelled], truth[labelled, :2], atol=2e-3)
            seen.append(sid)
    assert sorted(seen) == list(range(161, 177))  # images 161-176, each once


def test_dali_crop_matrix_is_the_one_predict_uses(lspet_shards):
    """`mshg predict` crops with OpenCV from `crop_matrix`; DALI builds it with fn.transforms."""
    shards = ShardSet.open(lspet_shards["val"])
    cfg = DataConfig(input_size=128, num_threads=1)
    b = read_all(shards, cfg, train=False)[0]
    for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
        np.testing.assert_allclose(b["matrix"][i].numpy(), crop_matrix(tight_box(sid), 128, cfg.padding),
                                   rtol=1e-4, atol=1e-3)


def test_validation_crop_pixels_are_opencvs_crop_of_the_source_and_region_decode_changes_nothing(lspet_shards):
    shards = ShardSet.open(lspet_shards["val"])
    region = read_all(shards, DataConfig(input_size=128, num_threads=1), train=False, batch=16)[0]
    full = read_all(shards, DataConfig(input_size=128, num_threads=1, region_decode=False), train=False, batch=16)[0]
    assert torch.equal(region["sample_id"], full["sample_id"])
    # ROI decoding + the shifted matrix give the full decode's crop (JPEG upsampling at the ROI edge: +-1)
    assert (region["image"].int() - full["image"].int()).abs().max() <= 1
    for i, sid in enumerate(region["sample_id"].view(-1).tolist()):
        ref = opencv_crop(source_image(sid), region["matrix"][i].numpy(), 128)
        diff = np.abs(region["image"][i].numpy().astype(int) - ref.astype(int))
        assert diff.mean() < 2.0, (sid, diff.mean())  # libjpeg settings differ slightly from PIL's


@pytest.mark.parametrize("interp", ["linear", "nn"])
def test_known_scale_rotation_flip_move_keypoints_and_pixels_by_the_same_matrix(lspet_shards, interp):
    """Scale fixed at 1.2, always flipped, always rotated (angle recovered from the matrix): the matrix is
    numpy's, keypoints are that matrix times the source joints, and the pixel under each transformed
    joint is the source pixel under the joint."""
    shards = ShardSet.open(lspet_shards["train"])
    size = 128
    cfg = DataConfig(input_size=size, scale_range=[1.2, 1.2], rotation_deg=30, rotation_prob=1.0, flip_prob=1.0,
                     interp=interp, **FIXED)
    b = read_all(shards, cfg, train=True, batch=16)[0]
    assert torch.all(b["flip"] == 1)
    angles, under_joint, shuffled = [], [], []
    for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
        m = b["matrix"][i].numpy().astype(np.float64)
        det = np.linalg.det(m[:, :2])
        assert det < 0  # mirrored
        zoom = size / (tight_box(sid)[2:].max() * cfg.padding * 1.2)
        assert np.sqrt(-det) == pytest.approx(zoom, rel=1e-4)
        angle = np.degrees(np.arctan2(-m[1, 0], -m[0, 0]))  # R @ diag(-z, z) = z [[-c, -s], [-s, c]]
        assert abs(angle) <= 30 + 1e-3
        angles.append(angle)
        np.testing.assert_allclose(m, augment_matrix(tight_box(sid), size, cfg.padding, 1.2, angle, True),
                                   rtol=1e-4, atol=2e-3)
        truth = JOINTS[:, :, sid - 1]
        expected = (truth[:, :2] + 0.5) @ m[:, :2].T + m[:, 2]
        labelled = truth[:, 2] > 0
        kp = b["keypoints"][i].numpy()
        np.testing.assert_allclose(kp[labelled, :2], expected[labelled], atol=2e-3)
        assert np.array_equal(kp[:, 2] > 0, labelled)

        src, crop = source_image(sid).astype(np.float32), b["image"][i].numpy().astype(np.float32)
        if interp == "linear":  # the whole crop is OpenCV's crop with this matrix
            assert np.abs(crop - opencv_crop(source_image(sid), m, size)).mean() < 2.0
        inside = labelled & np.all((kp[:, :2] > 2) & (kp[:, :2] < size - 2), axis=1)
        for j in np.flatnonzero(inside):
            under_joint.append(np.abs(bilinear(crop, *kp[j, :2]) - bilinear(src, *(truth[j, :2] + 0.5))).mean())
            k = (j + 7) % 14  # control: some other joint's pixel
            shuffled.append(np.abs(bilinear(crop, *kp[j, :2]) - bilinear(src, *(truth[k, :2] + 0.5))).mean())
    assert len(set(np.round(angles, 3))) >= 10 and max(np.abs(angles)) > 10  # really rotated, randomly
    assert len(under_joint) > 100
    tolerance = 5.0 if interp == "linear" else 7.0  # nearest: up to half a source pixel off
    assert np.median(under_joint) < tolerance, np.median(under_joint)
    assert np.median(shuffled) > 20  # the check can fail: other joints are far off (~50 here)


def test_flip_mirrors_pixels_and_keypoints_and_swaps_left_and_right(lspet_shards):
    shards = ShardSet.open(lspet_shards["train"])
    size = 64
    common = dict(input_size=size, scale_range=[1.0, 1.0], rotation_prob=0.0, interp="linear", **FIXED)
    plain = read_all(shards, DataConfig(flip_prob=0.0, **common), train=True, batch=16)[0]
    flipped = read_all(shards, DataConfig(flip_prob=1.0, **common), train=True, batch=16)[0]
    assert torch.equal(plain["sample_id"], flipped["sample_id"])  # the reader's order depends on the seed only
    assert torch.all(plain["flip"] == 0) and torch.all(flipped["flip"] == 1)
    mirror = (flipped["image"].flip(2).int() - plain["image"].int()).abs()
    assert mirror.float().mean() < 1.0  # the flipped crop is the plain crop mirrored
    kp_plain, kp_flip = plain["keypoints"], flipped["keypoints"]
    np.testing.assert_allclose(kp_flip[..., 0], size - kp_plain[..., 0], atol=1e-3)
    np.testing.assert_allclose(kp_flip[..., 1], kp_plain[..., 1], atol=1e-3)

    swapped = swap_flipped(kp_flip, flipped["flip"], shards.flip_permutation())
    pairs = lr_pairs(shards.joints)
    assert len(pairs) == 6  # ankle, knee, hip, wrist, elbow, shoulder
    for right, left in pairs:  # the "right wrist" of a flipped crop is the mirrored left wrist
        np.testing.assert_allclose(swapped[:, right, 0], size - kp_plain[:, left, 0], atol=1e-3)
        np.testing.assert_allclose(swapped[:, left, :2], (kp_flip[:, right, :2]), atol=0)
        assert torch.equal(swapped[:, right, 2], kp_plain[:, left, 2])
    for j in {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13} - {i for p in pairs for i in p}:  # neck, head
        assert torch.equal(swapped[:, j], kp_flip[:, j])


def test_two_ranks_cover_every_sample_once_per_epoch_shuffled_and_a_seed_repeats(lspet_shards, tmp_path):
    shards = ShardSet.open(shard_sample(tmp_path / "odd", 1, 21))  # 21 samples: ranks get 11 and 10
    cfg = DataConfig(input_size=32, num_threads=1, shuffle_buffer=32, color_jitter=0.2)
    runs = {rank: read_all(shards, cfg, True, rank, 2, batch=4, epochs=2) for rank in (0, 1)}
    for epoch in (0, 1):
        per_rank = [[i for b in runs[rank][epoch] for i in b["sample_id"].view(-1).tolist()] for rank in (0, 1)]
        assert sorted(per_rank[0] + per_rank[1]) == list(range(1, 22)), epoch  # padding dropped, none twice
        assert len(runs[0][epoch]) == len(runs[1][epoch]) == 3  # ranks stay in step
        assert per_rank[0] != sorted(per_rank[0]) or per_rank[1] != sorted(per_rank[1])  # shuffled
    again = read_all(shards, cfg, True, 0, 2, batch=4, epochs=2)
    for first, second in zip(runs[0][0] + runs[0][1], again[0] + again[1]):
        for key in ("sample_id", "keypoints", "flip", "matrix", "image"):
            assert torch.equal(first[key], second[key]), key
    resumed = build_loader(shards, cfg, 4, True, (0, 2))
    resumed.skip(4)  # one epoch (3 batches) and one batch: the rest of epoch 2 is what the first run had
    rest = [unpack(b, torch.device("cpu")) for b in resumed]
    assert resumed.batches_done == 6 and len(rest) == 2
    for first, second in zip(runs[0][1][1:], rest):
        assert torch.equal(first["image"], second["image"]) and torch.equal(first["matrix"], second["matrix"])
    other_seed = read_all(shards, DataConfig(**{**cfg.__dict__, "seed": 7}), True, 0, 2, batch=4)
    assert any(not torch.equal(a["matrix"], b["matrix"]) for a, b in zip(runs[0][0], other_seed))


def test_heatmaps_of_a_real_batch_peak_at_its_keypoints_at_all_three_resolutions(lspet_shards):
    shards = ShardSet.open(lspet_shards["train"])
    size = 128
    b = read_all(shards, DataConfig(input_size=size, num_threads=1), train=True, batch=16)[0]
    kp = swap_flipped(b["keypoints"], b["flip"], shards.flip_permutation())
    heatmaps, weights = make_targets(kp, size, [2, 2, 4, 4, 4, 4, 8, 8], sigma=2.0)
    assert sorted(heatmaps) == [2, 4, 8] and weights.sum() > 100
    for stride, hm in heatmaps.items():
        n = size // stride
        assert hm.shape == (16, 14, n, n)
        flat = hm.view(16, 14, -1).argmax(-1)
        for i, j in weights.nonzero().tolist():
            x, y = kp[i, j, :2].tolist()
            assert divmod(int(flat[i, j]), n) == (min(int(y / stride), n - 1), min(int(x / stride), n - 1))
            assert hm[i, j].max() > 0.6
        # zero-weight joints (unlabelled or pushed out of the crop) have empty heatmaps; a batch of 16 random
        # crops of LSPET always holds some (its occluded joints are labelled 0), so this is checked
        assert (weights == 0).any() and hm[weights == 0].abs().max() == 0


def test_joints_pushed_out_of_the_crop_get_weight_zero(lspet_shards):
    shards = ShardSet.open(lspet_shards["train"])
    size = 64
    b = read_all(shards, DataConfig(input_size=size, scale_range=[0.5, 0.5], **FIXED), train=True, batch=16)[0]
    kp = b["keypoints"]
    heatmaps, weights = make_targets(kp, size, [2, 4, 8], sigma=2.0)
    outside = ((kp[..., :2] < 0) | (kp[..., :2] >= size)).any(-1) & (kp[..., 2] > 0)
    assert outside.sum() > 20 and (~outside & (kp[..., 2] > 0)).sum() > 20  # zoomed in 2x: both kinds
    assert torch.all(weights[outside] == 0) and torch.all(weights[~outside & (kp[..., 2] > 0)] == 1)
    for hm in heatmaps.values():
        assert hm[outside].abs().max() == 0


def write_set_with_a_corrupt_image(src, out, bad_index, damage=None):
    """A shard set like `mshg shard` writes (ShardWriter tars, DALI indexes, a consistent manifest)
    where one sample's JPEG is cut after 300 bytes (or `damage` changes that sample's members)."""
    manifest = json.loads((src / "manifest.json").read_text())
    samples = {}
    for member, data in tar_members(src / manifest["shards"][0]["tar"]):
        key, ext = member.name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = data
    samples = list(samples.values())
    bad_key = samples[bad_index]["__key__"]
    if damage:
        damage(samples[bad_index])
    else:
        samples[bad_index]["jpg"] = samples[bad_index]["jpg"][:300]
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=12, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    shards = []
    for tar_path in sorted(out.glob("*.tar")):
        with IndexCreator(str(tar_path), str(tar_path.with_suffix(".idx")), verbose=False) as index:
            index.create_index()
        with tarfile.open(tar_path) as tar:
            count = len({m.name.split(".", 1)[0] for m in tar.getmembers()})
        shards.append({"tar": tar_path.name, "index": tar_path.with_suffix(".idx").name, "samples": count,
                       "bytes": tar_path.stat().st_size,
                       "sha256": hashlib.sha256(tar_path.read_bytes()).hexdigest()})
    manifest.update(shards=shards, num_samples=len(samples))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return bad_key


def test_an_undecodable_image_names_its_shard_and_key_and_verify_catches_it(lspet_shards, tmp_path, capsys):
    out = tmp_path / "bad"
    bad_key = write_set_with_a_corrupt_image(lspet_shards["val"], out, bad_index=13)  # in the second tar
    shards = ShardSet.open(out)
    with pytest.raises(BadSampleError) as error:
        for _ in range(3):  # epochs: the bad sample comes round in the first
            for _ in build_loader(shards, DataConfig(input_size=32, num_threads=1, shuffle_buffer=4), 4, True):
                pass
    message = str(error.value)
    assert f"shard-000001.tar sample {bad_key}" in message and "DALI" in message, message
    assert mshg(["verify", str(out), "--quiet"]) == 1
    report = capsys.readouterr()
    assert f"shard-000001.tar sample {bad_key}: image does not decode" in report.out + report.err


def one_joint_person(sample):
    """The sample as an older sharder wrote a person with a single labelled joint: a zero-size box."""
    kp = np.load(io.BytesIO(sample["kp.npy"]))
    j = int(np.flatnonzero(kp[:, 2] > 0)[0])
    kp[:, :] = 0
    kp[j] = [40.0, 50.0, 1.0]
    for ext, array in (("kp.npy", kp), ("box.npy", np.array([40.0, 50.0, 0.0, 0.0], np.float32))):
        buf = io.BytesIO()
        np.save(buf, array)
        sample[ext] = buf.getvalue()


def test_a_zero_size_box_gives_finite_crops_and_targets_and_verify_refuses_it(lspet_shards, tmp_path, capsys):
    """Issue 48: a box of one point made the crop's zoom size / 0: NaN keypoints and targets (DALI), a
    ZeroDivisionError in `crop_matrix` (mshg predict, evaluate --photos boxes). A minimum box side keeps them
    finite; `mshg shard` skips such persons and `mshg verify` names one left in older shards."""
    out = tmp_path / "bad"
    bad_key = write_set_with_a_corrupt_image(lspet_shards["val"], out, bad_index=13, damage=one_joint_person)
    shards = ShardSet.open(out)
    for train in (False, True):
        cfg = DataConfig(input_size=32, num_threads=1, shuffle_buffer=4)
        for b in read_all(shards, cfg, train=train, batch=8):
            heatmaps, weights = make_targets(b["keypoints"], 32, [2, 4, 8], sigma=2.0)
            assert torch.isfinite(b["keypoints"]).all() and torch.isfinite(b["matrix"]).all(), train
            assert all(torch.isfinite(h).all() for h in heatmaps.values()) and torch.isfinite(weights).all()
    assert np.isfinite(crop_matrix([40.0, 50.0, 0.0, 0.0], 64, 1.25)).all()
    assert mshg(["verify", str(out), "--quiet"]) == 1
    report = capsys.readouterr()
    assert f"shard-000001.tar sample {bad_key}: person box" in report.out + report.err


def test_show_batch_writes_a_png_grid_with_skeletons(lspet_shards, tmp_path):
    from tests.conftest import tiny_config

    from pipeline.show import LEFT, RIGHT

    out = tmp_path / "grid" / "batch.png"
    config = tiny_config(tmp_path, lspet_shards)  # input 64: tiles enlarged 4x to 256
    assert mshg(["show-batch", "--config", str(config), "--out", str(out), "--batch", "6", "--stride", "2"]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (4 * 256, 2 * 256 + 18)
        grid = np.asarray(png.convert("RGB"))
    for colour in (RIGHT, LEFT):  # joints of both sides were drawn
        assert (np.abs(grid[:512].astype(int) - colour).sum(-1) == 0).sum() > 50
    assert grid[:256, 512:768].std() > 20 and grid[256:512, 512:].max() == 0  # a crop; empty cells black
    assert mshg(["show-batch", "--config", str(config), "--out", str(out), "--val", "--stride", "3"]) == 2


@pytest.mark.parametrize("size", [32, 192])  # 32: gains after the warp (region > crop); 192: before it
def test_colour_jitter_is_a_gain_per_channel_and_sample(lspet_shards, size):
    shards = ShardSet.open(lspet_shards["val"])
    common = dict(input_size=size, num_threads=1, scale_range=[1.0, 1.0], rotation_prob=0.0, flip_prob=0.0,
                  interp="nn")
    plain = read_all(shards, DataConfig(color_jitter=0.0, **common), train=True, batch=16)[0]
    jittered = read_all(shards, DataConfig(color_jitter=0.2, **common), train=True, batch=16)[0]
    assert torch.equal(plain["matrix"], jittered["matrix"])  # same geometry, only colour differs
    gains = []
    for p, j in zip(plain["image"].numpy().astype(float), jittered["image"].numpy().astype(float)):
        for c in range(3):
            mid = (p[..., c] > 40) & (p[..., c] < 200)
            g = np.median(j[..., c][mid] / p[..., c][mid])
            assert 0.79 < g < 1.21
            assert np.mean(np.abs(j[..., c][mid] - p[..., c][mid] * g) <= 1.5) > 0.95  # one gain per channel
            gains.append(g)
    gains = np.array(gains).reshape(-1, 3)
    assert np.ptp(gains, axis=1).mean() > 0.05 and np.ptp(gains, axis=0).min() > 0.1  # per channel, per sample


def test_whole_image_framing_is_the_crop_mshg_predict_makes_of_a_bare_photo(lspet_shards):
    """data.whole_image_prob=1: every training crop frames the whole photo exactly as `mshg predict`
    frames a photo given without a box (scale, rotation and flip switched off to compare)."""
    shards = ShardSet.open(lspet_shards["train"])
    size = 96
    cfg = DataConfig(input_size=size, scale_range=[1.0, 1.0], rotation_prob=0.0, flip_prob=0.0,
                     whole_image_prob=1.0, **FIXED)
    b = read_all(shards, cfg, train=True, batch=8)[0]
    for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
        height, width = source_image(sid).shape[:2]
        np.testing.assert_allclose(b["matrix"][i].numpy(), crop_matrix([0, 0, width, height], size, cfg.padding),
                                   rtol=1e-4, atol=2e-3)
    tight = read_all(shards, dataclasses.replace(cfg, whole_image_prob=0.0), train=True, batch=8)[0]
    sid = tight["sample_id"].view(-1).tolist()[0]
    np.testing.assert_allclose(tight["matrix"][0].numpy(), crop_matrix(tight_box(sid), size, cfg.padding),
                               rtol=1e-4, atol=2e-3)  # and 0: the person's box, as before
