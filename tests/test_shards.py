"""
Tests of shards/: real pose data through the sharder, verify, and DALI's webdataset reader.
Most use the LSPET sample embedded in shards/sample/lspet; those marked `shared` need ../shared/data.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from shards import datasets
from shards.verify import verify
from shards.write import write_shards

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "shards" / "sample" / "lspet"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


def shard_cli(*args):
    """Run `python -m shards.cli ...` as a user would; -> CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "shards.cli", *map(str, args), "--quiet"] if args[0] == "shard"
                          else [sys.executable, "-m", "shards.cli", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def sample_joints():
    return scipy.io.loadmat(SAMPLE / "joints.mat")["joints"]  # (14, 3, 200)


def dali_read(out, ext=("jpg", "kp.npy", "box.npy", "idx.npy")):
    """Every sample of a shard directory through DALI's reader, no augmentation: -> list of dicts."""
    from nvidia.dali import fn, pipeline_def

    manifest = json.loads((Path(out) / "manifest.json").read_text())
    tars = [str(Path(out) / s["tar"]) for s in manifest["shards"]]
    idxs = [str(Path(out) / s["index"]) for s in manifest["shards"]]
    n = manifest["num_samples"]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        image, kp, box, idx = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=list(ext), name="reader")
        return fn.decoders.image(image, device="cpu"), fn.decoders.numpy(kp), fn.decoders.numpy(box), fn.decoders.numpy(idx)

    p = pipe()
    p.build()
    samples = []
    for _ in range(n):
        image, kp, box, idx = (np.array(o.at(0)) for o in p.run())
        samples.append({"image": image, "kp": kp, "box": box, "idx": int(idx[0])})
    return samples


# -----------------------------------------------------------------------------
# LSPET, from the embedded sample


@pytest.fixture(scope="module")
def lspet_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("lspet")
    r = shard_cli("shard", "lspet", "--root", SAMPLE, "--out", out, "--maxcount", 64)
    assert r.returncode == 0, r.stderr
    return out


def test_lspet_manifest(lspet_out):
    m = json.loads((lspet_out / "manifest.json").read_text())
    assert m["dataset"] == "lspet" and m["num_samples"] == 200 and m["skipped"] == []
    assert m["joints"][0] == "right_ankle" and m["joints"][13] == "head_top"
    assert [0, 5] in m["flip_pairs"] and len(m["flip_pairs"]) == 6
    assert [s["samples"] for s in m["shards"]] == [64, 64, 64, 8]
    for s in m["shards"]:
        assert (lspet_out / s["tar"]).stat().st_size == s["bytes"]
        assert (lspet_out / s["index"]).read_text().startswith(f"v1.2 {s['samples']}\n")
    assert sorted(os.listdir(lspet_out)) == sorted(["manifest.json"] + [s["tar"] for s in m["shards"]]
                                                   + [s["index"] for s in m["shards"]])


def test_lspet_verify_ok(lspet_out):
    r = shard_cli("verify", lspet_out)
    assert r.returncode == 0, r.stderr
    assert verify(str(lspet_out), progress=False) == []


def test_lspet_dali_round_trip(lspet_out):
    """Read back through DALI: every image once, keypoints equal joints.mat (invisible -> 0)."""
    joints = sample_joints()
    samples = dali_read(lspet_out)
    assert sorted(s["idx"] for s in samples) == list(range(1, 201))
    jpeg_bytes = (SAMPLE / "images" / "im00001.jpg").read_bytes()
    for s in samples:
        src = joints[:, :, s["idx"] - 1]
        vis = src[:, 2] > 0
        assert s["kp"].dtype == np.float32 and s["kp"].shape == (14, 3)
        np.testing.assert_array_equal(s["kp"][vis, :2], src[vis, :2].astype(np.float32))
        assert (s["kp"][vis, 2] == 1).all() and (s["kp"][~vis] == 0).all()
        x0, y0 = src[vis, :2].min(0)
        x1, y1 = src[vis, :2].max(0)
        np.testing.assert_allclose(s["box"], [x0, y0, x1 - x0, y1 - y0], rtol=1e-6)
        assert s["image"].ndim == 3 and s["image"].shape[2] == 3
    # the JPEG is passed through byte for byte
    import tarfile
    with tarfile.open(lspet_out / "shard-000000.tar") as tar:
        assert tar.extractfile("lspet_000001.jpg").read() == jpeg_bytes
