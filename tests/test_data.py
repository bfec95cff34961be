"""The DALI pipeline on real shards of the embedded LSPET sample (CPU-only DALI)."""
import numpy as np
import scipy.io
import torch

from pipeline.config import DataConfig
from pipeline.data import ShardSet, build_loader, unpack
from pipeline.evaluate import crop_matrix, crop_to_original
from tests.conftest import SAMPLE

JOINTS = scipy.io.loadmat(SAMPLE / "joints.mat")["joints"]  # (14, 3, 200); column i is im{i+1:05d}


def read_all(shards, cfg, train, rank=0, world=1, batch=8):
    return [unpack(b, torch.device("cpu")) for b in build_loader(shards, cfg, batch, train, rank, world)]


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
        kp = JOINTS[:, :, sid - 1]
        xy = kp[kp[:, 2] > 0, :2]
        box = [xy[:, 0].min(), xy[:, 1].min(), np.ptp(xy[:, 0]), np.ptp(xy[:, 1])]
        np.testing.assert_allclose(b["matrix"][i].numpy(), crop_matrix(np.array(box), 128, cfg.padding),
                                   rtol=1e-4, atol=1e-3)
