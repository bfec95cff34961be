"""
Tests of shards/: real pose data through the sharder, `verify`, and DALI's webdataset reader.
Most use the LSPET sample embedded in shards/sample/lspet; those marked `shared` need ../shared/data.
"""

import argparse
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from wds2idx import IndexCreator

from shards import cli
from shards.verify import verify
from tests.helpers import reseal, rewrite_tar, tar_members

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "shards" / "sample" / "lspet"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")
MPII_FIXTURE = REPO / "tests" / "fixtures" / "mpii" / "test_mpii.json"  # = ../shared/data/pose_fixtures/mpii's


def run(capsys, *argv):
    """The CLI in-process, as pipeline/cli.py wires it: -> (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    argv = [str(a) for a in argv]
    args = parser.parse_args(argv + (["--quiet"] if argv[0] in ("shard", "verify") else []))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


def dali_read(out, image_ext="jpg"):
    """Every sample of a shard directory through DALI's reader, no augmentation: -> {idx: sample}."""
    from nvidia.dali import fn, pipeline_def

    m = manifest(out)
    tars = [str(Path(out) / s["tar"]) for s in m["shards"]]
    idxs = [str(Path(out) / s["index"]) for s in m["shards"]]
    n = m["num_samples"]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        image, kp, box, idx = fn.readers.webdataset(paths=tars, index_paths=idxs,
                                                    ext=[image_ext, "kp.npy", "box.npy", "idx.npy"], name="reader")
        return fn.decoders.image(image, device="cpu"), fn.decoders.numpy(kp), fn.decoders.numpy(box), fn.decoders.numpy(idx)

    p = pipe()
    p.build()
    image, kp, box, idx = p.run()
    samples = {}
    for b in range(n):
        i = int(np.array(idx.at(b))[0])
        assert i not in samples, f"sample {i} read twice"
        samples[i] = {"image": np.array(image.at(b)), "kp": np.array(kp.at(b)), "box": np.array(box.at(b))}
    return samples


def small_lspet(root, n=6):
    """An LSPET-format folder with the first n images of the embedded sample; -> joints (14, 3, n)."""
    (root / "images").mkdir(parents=True)
    for i in range(1, n + 1):
        shutil.copy(SAMPLE / "images" / f"im{i:05d}.jpg", root / "images")
    joints = scipy.io.loadmat(SAMPLE / "joints.mat")["joints"][:, :, :n].copy()
    scipy.io.savemat(root / "joints.mat", {"joints": joints})
    return joints


def tar_bytes(out):
    return {name: (Path(out) / name).read_bytes() for name in sorted(os.listdir(out)) if not name.endswith(".json")}


# -----------------------------------------------------------------------------
# LSPET from the embedded sample


@pytest.fixture(scope="module")
def lspet_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("lspet")
    r = subprocess.run([sys.executable, "-m", "shards.cli", "shard", "lspet", "--root", SAMPLE, "--out", out,
                        "--maxcount", "64", "--order", "source", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "200 samples in 4 shards, 0 skipped" in r.stdout
    return out


def test_lspet_manifest(lspet_out):
    m = manifest(lspet_out)
    assert m["dataset"] == "lspet" and m["num_samples"] == 200 and m["skipped"] == []
    assert m["joints"][0] == "right_ankle" and m["joints"][13] == "head_top"
    assert m["flip_pairs"] == [[0, 5], [1, 4], [2, 3], [6, 11], [7, 10], [8, 9]]
    assert [s["samples"] for s in m["shards"]] == [64, 64, 64, 8]
    assert m["args"]["maxcount"] == 64 and m["source"]["root"] == str(SAMPLE)
    for s in m["shards"]:
        assert (lspet_out / s["tar"]).stat().st_size == s["bytes"]
    assert sorted(os.listdir(lspet_out)) == sorted(["manifest.json"] + [s["tar"] for s in m["shards"]]
                                                   + [s["index"] for s in m["shards"]])


def test_lspet_index_equals_wds2idx(lspet_out, tmp_path):
    for s in manifest(lspet_out)["shards"]:
        with IndexCreator(str(lspet_out / s["tar"]), str(tmp_path / "ref.idx"), verbose=False) as ref:
            ref.create_index()
        assert (lspet_out / s["index"]).read_text() == (tmp_path / "ref.idx").read_text()


def test_lspet_tar_bytes_equal_tarfile_and_webdataset(lspet_out, tmp_path):
    """The sharder writes tar headers itself (for speed): the bytes must be exactly what the standard
    library's tarfile and webdataset's TarWriter write for the same members and fixed metadata."""
    import webdataset as wds

    shard = manifest(lspet_out)["shards"][0]
    written = (lspet_out / shard["tar"]).read_bytes()
    members = tar_members(lspet_out / shard["tar"])
    assert len(members) == 5 * shard["samples"]
    assert all((m.mode, m.uname, m.gname, m.uid, m.mtime, m.type) == (0o444, "mshg", "mshg", 0, 0, tarfile.REGTYPE)
               for m, _ in members)
    by_stdlib = io.BytesIO()
    with tarfile.open(fileobj=by_stdlib, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    assert by_stdlib.getvalue() == written
    samples = {}
    for m, data in members:
        key, ext = m.name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = data
    with wds.TarWriter(str(tmp_path / "wds.tar"), user="mshg", group="mshg", mode=0o444, mtime=0, encoder=False) as w:
        for sample in samples.values():
            w.write(sample)
    assert (tmp_path / "wds.tar").read_bytes() == written


def test_lspet_verify_ok(lspet_out, capsys):
    assert run(capsys, "verify", lspet_out)[0] == 0


def test_lspet_dali_round_trip(lspet_out):
    """Through DALI: every image once, keypoints equal joints.mat (invisible joints -> 0), tight box."""
    joints = scipy.io.loadmat(SAMPLE / "joints.mat")["joints"]
    samples = dali_read(lspet_out)
    assert sorted(samples) == list(range(1, 201))
    for i, s in samples.items():
        src = joints[:, :, i - 1]
        vis = src[:, 2] > 0
        assert s["kp"].dtype == np.float32 and s["kp"].shape == (14, 3)
        np.testing.assert_array_equal(s["kp"][vis, :2], src[vis, :2].astype(np.float32))
        assert (s["kp"][vis, 2] == 1).all() and (s["kp"][~vis] == 0).all()
        (x0, y0), (x1, y1) = src[vis, :2].min(0), src[vis, :2].max(0)
        np.testing.assert_allclose(s["box"], [x0, y0, x1 - x0, y1 - y0], rtol=1e-6)
        assert s["image"].ndim == 3 and s["image"].shape[2] == 3
    with tarfile.open(lspet_out / "shard-000000.tar") as tar:  # JPEG bytes pass through unchanged
        assert tar.extractfile("lspet_000001.jpg").read() == (SAMPLE / "images" / "im00001.jpg").read_bytes()
        meta = json.loads(tar.extractfile("lspet_000001.json").read())
    from PIL import Image
    width, height = Image.open(SAMPLE / "images" / "im00001.jpg").size
    assert (meta["width"], meta["height"], meta["dataset"]) == (width, height, "lspet")
    assert samples[1]["image"].shape == (height, width, 3)


def test_range_and_determinism(tmp_path, capsys):
    """--range 1:160 is im00001..im00160 (in a seeded shuffle, the default order); same input -> identical
    bytes, whatever --workers."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--out", a, "--range", "1:160", "--maxcount", 50)[0] == 0
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--out", b, "--range", "1:160", "--maxcount", 50,
               "--workers", 2)[0] == 0
    assert manifest(a)["num_samples"] == 160
    ids = [int(np.load(io.BytesIO(t.extractfile(m).read()))[0]) for s in manifest(a)["shards"]
           for t in [tarfile.open(a / s["tar"])] for m in t.getmembers() if m.name.endswith(".idx.npy")]
    assert sorted(ids) == list(range(1, 161)) and ids != sorted(ids)
    assert tar_bytes(a) == tar_bytes(b) and len(tar_bytes(a)) == 8
    assert [s["sha256"] for s in manifest(a)["shards"]] == [s["sha256"] for s in manifest(b)["shards"]]
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--out", a, "--range", "1:160", "--maxcount", 50,
               "--overwrite")[0] == 0
    assert tar_bytes(a) == tar_bytes(b)
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--out", a, "--range", "150:201", "--overwrite")[0] == 2


def test_split_file_prefix_and_max_size_shape_the_set(tmp_path, capsys):
    """`mshg shard lspet` on the embedded sample: --split-file keeps only the images it lists (comments and
    folders ignored), --prefix names the tars, --max-size cuts a new tar before one would pass the size."""
    chosen = [3, 5, 8, 13, 21, 34, 55, 89, 144, 199]
    split = tmp_path / "val_images.txt"
    split.write_text("# the validation images\n" + "".join(f"images/im{i:05d}.jpg  # #{i}\n" for i in chosen) + "\n")
    out = tmp_path / "val"
    sizes = [(SAMPLE / "images" / f"im{i:05d}.jpg").stat().st_size + 5 * 1024 for i in chosen]
    limit = 3 * max(sizes)  # 3 samples a tar at least, the 10 need several
    code, _, err = run(capsys, "shard", "lspet", "--root", SAMPLE, "--out", out, "--split-file", split,
                       "--prefix", "lspet-val", "--max-size", limit, "--order", "source")
    assert code == 0, err
    m = manifest(out)
    assert m["num_samples"] == len(chosen) and m["source"]["split_file"] == str(split)
    assert len(m["shards"]) >= 2 and sum(s["samples"] for s in m["shards"]) == len(chosen)
    assert [s["tar"] for s in m["shards"]] == [f"lspet-val-{n:06d}.tar" for n in range(len(m["shards"]))]
    assert sorted(os.listdir(out)) == sorted(["manifest.json", *(s["tar"] for s in m["shards"]),
                                              *(s["index"] for s in m["shards"])])
    keys = []
    for s in m["shards"]:
        with tarfile.open(out / s["tar"]) as tar:
            keys += sorted({member.name.split(".", 1)[0] for member in tar.getmembers()})
    assert keys == [f"lspet_{i:06d}" for i in chosen]  # --order source: in the split's order
    # the size is reckoned from the files (image + 5 KiB of small members; a tar itself is padded to 10 KiB
    # records): each tar holds what fits the limit, and a new one starts where the next sample would not
    ends = np.cumsum([s["samples"] for s in m["shards"]])
    for start, end in zip([0, *ends[:-1]], ends):
        assert sum(sizes[start:end]) <= limit
        assert end == len(chosen) or sum(sizes[start:end + 1]) > limit
    assert verify(str(out), progress=False) == []
    # without --max-size the same 10 fit one tar
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--out", tmp_path / "one", "--split-file", split)[0] == 0
    assert [s["samples"] for s in manifest(tmp_path / "one")["shards"]] == [len(chosen)]


def test_lsp_format(tmp_path, capsys):
    """Original LSP layout: joints (3, 14, N), third row invisibility, im0001.jpg names."""
    root = tmp_path / "lsp"
    joints = small_lspet(root, n=5)
    lsp = np.stack([joints[:, 0], joints[:, 1], 1 - joints[:, 2]])  # (3, 14, N)
    lsp[:, 0, 1] = [-7, 999, 1]  # invisible joint with junk coordinates
    scipy.io.savemat(root / "joints.mat", {"joints": lsp})
    for i in range(1, 6):
        os.rename(root / "images" / f"im{i:05d}.jpg", root / "images" / f"im{i:04d}.jpg")
    code, out, err = run(capsys, "shard", "lsp", "--root", root, "--out", tmp_path / "out")
    assert code == 0, err
    samples = dali_read(tmp_path / "out")
    assert sorted(samples) == [1, 2, 3, 4, 5]
    for i, s in samples.items():
        vis = lsp[2, :, i - 1] == 0
        np.testing.assert_array_equal(s["kp"][vis, :2], lsp[:2, vis, i - 1].T.astype(np.float32))
        assert (s["kp"][~vis] == 0).all() and (s["kp"][vis, 2] == 1).all()
    assert (samples[2]["kp"][0] == 0).all()
    # an LSPET file given to `shard lsp` is refused with a message naming the field
    code, _, err = run(capsys, "shard", "lsp", "--root", SAMPLE, "--out", tmp_path / "x")
    assert code == 2 and "'joints' has shape (14, 3, 200)" in err and "shard lspet" in err


def test_non_jpeg_sources(tmp_path, capsys):
    """PNG passes through unchanged, other formats (a CMYK TIFF) become lossless PNG; --non-jpeg jpg
    makes every member a JPEG. DALI reads mixed shards with ext "jpg;png"."""
    from PIL import Image

    root = tmp_path / "lspet"
    small_lspet(root, n=3)
    Image.open(root / "images" / "im00002.jpg").save(root / "images" / "im00002.jpg", format="PNG")
    tiff = Image.open(root / "images" / "im00003.jpg").convert("CMYK")
    tiff.save(root / "images" / "im00003.jpg", format="TIFF")
    assert run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "png")[0] == 0
    with tarfile.open(tmp_path / "png" / "shard-000000.tar") as t:
        names = t.getnames()
        assert t.extractfile("lspet_000002.png").read() == (root / "images" / "im00002.jpg").read_bytes()
        converted = Image.open(io.BytesIO(t.extractfile("lspet_000003.png").read()))
        assert np.array_equal(np.array(converted), np.array(tiff.convert("RGB")))
    assert {"lspet_000001.jpg", "lspet_000002.png", "lspet_000003.png"} <= set(names)
    samples = dali_read(tmp_path / "png", image_ext="jpg;png")
    assert samples[3]["image"].shape == (tiff.height, tiff.width, 3)
    assert run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "jpg", "--non-jpeg", "jpg")[0] == 0
    assert sorted(dali_read(tmp_path / "jpg")) == [1, 2, 3]
    assert verify(str(tmp_path / "png"), progress=False) == verify(str(tmp_path / "jpg"), progress=False) == []


# -----------------------------------------------------------------------------
# bad input: skip-and-count or a clear error, never a crash, never silent


def test_bad_images_are_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "lspet"
    small_lspet(root, n=6)
    images = root / "images"
    os.remove(images / "im00002.jpg")  # listed but missing
    data = (images / "im00003.jpg").read_bytes()
    (images / "im00003.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (images / "im00004.jpg").write_bytes(b"")  # zero bytes
    (images / "im00005.jpg").write_bytes(b"\0" * 64 + data[64:])  # corrupt header
    code, out, err = run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "out")
    assert code == 1 and "3 of 6 persons (50 %) were skipped for a problem, more than --max-skipped 0.2" in err
    code, out, err = run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "out", "--overwrite",
                         "--max-skipped", "0.6")  # a user who expects these skips says so
    assert code == 0, err
    m = manifest(tmp_path / "out")
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert reasons["lspet_000002"] == "image file missing"
    assert reasons["lspet_000003"].startswith("truncated JPEG")
    assert reasons["lspet_000004"] == "empty image file (0 bytes)"
    assert reasons["lspet_000005"].startswith("not a readable image")
    assert m["num_samples"] == 2 and m["num_skipped"] == 4 and "skipped 1: image file missing" in out
    assert sorted(dali_read(tmp_path / "out")) == [1, 6]
    assert verify(str(tmp_path / "out"), progress=False) == []


def test_bad_keypoints(tmp_path, capsys):
    """Far outside the image / NaN / inf -> that joint unlabelled and reported; no joint left -> skipped;
    just outside (a real LSPET click at y = -1.17, im00024) -> kept."""
    root = tmp_path / "lspet"
    joints = small_lspet(root, n=24)
    joints[0, :, 0] = [5000.0, 40.0, 1]  # im00001 right ankle far outside the 157 px wide image
    joints[1, :, 0] = [np.nan, 40.0, 1]
    joints[2, :, 0] = [30.0, np.inf, 1]
    joints[:, 2, 2] = 0  # im00003: no labelled joint
    scipy.io.savemat(root / "joints.mat", {"joints": joints})
    assert run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "out")[0] == 0
    m = manifest(tmp_path / "out")
    assert [(s["key"], s["reason"]) for s in m["skipped"]] == [("lspet_000003", "no labelled joints")]
    dropped = [(d["key"], d["joint"], d["reason"].split(" ")[0]) for d in m["dropped_joints"]]
    assert dropped == [("lspet_000001", "right_ankle", "keypoint"), ("lspet_000001", "right_knee", "non-finite"),
                       ("lspet_000001", "right_hip", "non-finite")]
    assert "outside the 157x105 image" in m["dropped_joints"][0]["reason"]
    samples = dali_read(tmp_path / "out")
    assert (samples[1]["kp"][:3] == 0).all() and (samples[1]["kp"][3:, 2] == joints[3:, 2, 0]).all()
    assert samples[24]["kp"][13].tolist() == pytest.approx([joints[13, 0, 23], joints[13, 1, 23], 1.0])
    assert samples[24]["kp"][13, 1] < 0
    assert verify(str(tmp_path / "out"), progress=False) == []


def test_a_person_with_one_labelled_joint_is_skipped_and_counted(tmp_path, capsys):
    """Issue 48: one labelled joint makes a zero-size tight box, which the crop divides by: skipped at shard
    time, with its reason in the summary, as other skips are."""
    root = tmp_path / "lspet"
    joints = small_lspet(root, n=6)
    joints[1:, 2, 1] = 0  # im00002: the right ankle only
    scipy.io.savemat(root / "joints.mat", {"joints": joints})
    code, out, err = run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "out")
    assert code == 0, err
    m = manifest(tmp_path / "out")
    assert [s["key"] for s in m["skipped"]] == ["lspet_000002"] and m["num_samples"] == 5
    assert m["skipped"][0]["reason"].startswith("person box smaller than 1 px")
    assert "skipped 1: person box smaller than 1 px" in out
    assert verify(str(tmp_path / "out"), progress=False) == []


def test_bad_annotation_files(tmp_path, capsys):
    """Wrong joint count, malformed .mat / JSON, missing field: exit 2 and a message naming file and field."""
    root = tmp_path / "lspet"
    joints = small_lspet(root, n=3)
    scipy.io.savemat(root / "joints.mat", {"joints": joints[:13]})
    code, _, err = run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "o1")
    assert code == 2 and f"{root / 'joints.mat'}: field 'joints' has shape (13, 3, 3)" in err
    (root / "joints.mat").write_bytes(b"MATLAB 5.0 MAT-file, but cut short")
    code, _, err = run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "o2")
    assert code == 2 and "not a readable MATLAB .mat file" in err and str(root / "joints.mat") in err
    scipy.io.savemat(root / "joints.mat", {"points": joints})
    code, _, err = run(capsys, "shard", "lspet", "--root", root, "--out", tmp_path / "o3")
    assert code == 2 and "no variable 'joints' (found ['points'])" in err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"image": "a.jpg", "joints": [[1, 2]')
    code, _, err = run(capsys, "shard", "mpii", "--images", root, "--annotations", bad_json, "--out", tmp_path / "o4")
    assert code == 2 and f"{bad_json}: malformed JSON at line 1" in err
    bad_json.write_text('[{"image": "a.jpg", "center": [1, 2], "scale": 1, "joints_vis": []}]')
    code, _, err = run(capsys, "shard", "mpii", "--images", root, "--annotations", bad_json, "--out", tmp_path / "o5")
    assert code == 2 and "record 0 has no field 'joints'" in err
    bad_json.write_text('{"images": [], "annotations": {}, "categories": [{"id": 1, "keypoints": ["a"]}]}')
    code, _, err = run(capsys, "shard", "coco", "--images", root, "--annotations", bad_json, "--out", tmp_path / "o6")
    assert code == 2 and "field 'annotations' missing or not a list" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


def test_existing_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"old")
    code, _, err = run(capsys, "shard", "lspet", "--root", SAMPLE, "--range", "1:3", "--out", out)
    assert code == 1 and "not empty" in err and "--overwrite" in err
    assert (out / "shard-000000.tar").read_bytes() == b"old"
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--range", "1:3", "--out", out, "--overwrite")[0] == 0
    assert manifest(out)["num_samples"] == 3 and verify(str(out), progress=False) == []


def test_a_failed_overwrite_keeps_the_old_shards_and_others_files(tmp_path, capsys, monkeypatch):
    """Issue 48: --overwrite deleted every *.tar/*.idx in --out before writing anything. Now the new set is
    written aside and swapped in at the end: a re-shard that fails keeps the old set whole, and files that
    are not the set's stay."""
    from shards import write

    out = tmp_path / "out"
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--range", "1:6", "--maxcount", 2, "--out", out)[0] == 0
    (out / "other-000000.tar").write_bytes(b"someone else's")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = write.make_sample, []

    def disk_full_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(write, "make_sample", disk_full_at_the_third)
    code, _, err = run(capsys, "shard", "lspet", "--root", SAMPLE, "--range", "1:3", "--maxcount", 2, "--out", out,
                       "--overwrite")
    assert code == 1 and "No space left on device" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing added, nothing lost
    monkeypatch.setattr(write, "make_sample", real)
    code, _, err = run(capsys, "shard", "lspet", "--root", SAMPLE, "--range", "1:3", "--maxcount", 2, "--out", out,
                       "--overwrite")
    assert code == 0, err
    assert manifest(out)["num_samples"] == 3 and len(manifest(out)["shards"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "other-000000.tar",
                                                    "shard-000000.idx", "shard-000000.tar", "shard-000001.idx",
                                                    "shard-000001.tar"]  # the old shard-000002 is gone
    assert (out / "other-000000.tar").read_bytes() == b"someone else's"
    assert verify(str(out), progress=False) == ["other-000000.tar: tar file not listed in manifest.json"]


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    code, _, err = run(capsys, "shard", "lspet", "--root", SAMPLE, "--range", "1:3", "--out", blocker / "out")
    assert code == 1 and "cannot use output directory" in err


def test_full_disk_leaves_no_shard_looking_complete(tmp_path):
    """Files may not grow past 1 MB (RLIMIT_FSIZE, as a full disk would stop them): a clear error,
    no partial file, no .tar and no manifest left behind."""
    out = tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = subprocess.run([sys.executable, "-m", "shards.cli", "shard", "lspet", "--root", SAMPLE, "--out", out,
                        "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert r.returncode == 1, r.stderr
    assert f"writing shards to {out} failed" in r.stderr and "File too large" in r.stderr
    assert os.listdir(out) == []


# -----------------------------------------------------------------------------
# verify finds damage and names shard and sample


def test_verify_names_the_bad_shard_and_sample(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "shard", "lspet", "--root", SAMPLE, "--range", "1:20", "--maxcount", 10, "--out", out,
               "--order", "source")[0] == 0
    # a flipped byte in a JPEG of the second shard
    tar = out / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as t:
        member = t.getmember("lspet_000015.jpg")
    data[member.offset_data + 10] ^= 0xFF
    tar.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", out)
    assert code == 1 and "shard-000001.tar: sha256 differs from manifest" in err
    # a sample whose keypoints hold NaN, written with a correct checksum: found by content
    bad = io.BytesIO()
    np.save(bad, np.full((14, 3), np.nan, dtype=np.float32))
    rewrite_tar(out / "shard-000000.tar", lambda name, data: bad.getvalue() if name == "lspet_000004.kp.npy" else data)
    reseal(out, "shard-000000.tar")
    code, _, err = run(capsys, "verify", out)
    assert code == 1 and "shard-000000.tar sample lspet_000004: kp.npy holds non-finite values" in err
    # a missing index and an unlisted tar
    os.remove(out / "shard-000001.idx")
    shutil.copy(out / "shard-000000.tar", out / "stray.tar")
    code, _, err = run(capsys, "verify", out)
    assert "shard-000001.tar: index shard-000001.idx missing" in err and "stray.tar: tar file not listed" in err


# -----------------------------------------------------------------------------
# real data from ../shared/data


@shared
def test_lspet_validation_split_from_shared(tmp_path, capsys):
    """im08001..im08100 of the full set, in 2 workers; im08075 has a real joint 145 px outside its image."""
    root = SHARED / "lspet"
    out = tmp_path / "out"
    assert run(capsys, "shard", "lspet", "--root", root, "--range", "8001:8100", "--out", out, "--workers", 2,
               "--maxcount", 30)[0] == 0
    joints = scipy.io.loadmat(root / "joints.mat")["joints"]
    samples = dali_read(out)
    assert sorted(samples) == list(range(8001, 8101))
    m = manifest(out)
    assert [(d["key"], d["joint"]) for d in m["dropped_joints"]] == [("lspet_008075", "right_knee")]
    for i, s in samples.items():
        vis = (joints[:, 2, i - 1] > 0) & ~((i == 8075) & (np.arange(14) == 1))
        np.testing.assert_array_equal(s["kp"][vis, :2], joints[vis, :2, i - 1].astype(np.float32))
        assert (s["kp"][~vis] == 0).all()
    assert verify(str(out), progress=False) == []


def test_mpii_fixtures_round_trip(tmp_path, capsys):
    ann = MPII_FIXTURE
    out = tmp_path / "out"
    assert run(capsys, "shard", "mpii", "--images", ann.parent, "--annotations", ann, "--out", out)[0] == 0
    assert verify(str(out), progress=False) == []
    records = json.loads(ann.read_text())
    samples = dali_read(out)
    assert sorted(samples) == list(range(len(records))) == [0, 1, 2, 3, 4]
    for i, s in samples.items():
        rec = records[i]
        vis = np.array(rec["joints_vis"]) > 0
        np.testing.assert_allclose(s["kp"][vis, :2], np.array(rec["joints"])[vis] - 1, rtol=1e-6)
        assert (s["kp"][~vis] == 0).all()
        size = rec["scale"] * 200
        np.testing.assert_allclose(s["box"], [rec["center"][0] - 1 - size / 2, rec["center"][1] - 1 - size / 2,
                                              size, size], rtol=1e-5)
    assert manifest(out)["joints"][9] == "head_top" and [10, 15] in manifest(out)["flip_pairs"]
    # a record with 15 joints is skipped and counted, not a crash
    records[2]["joints"] = records[2]["joints"][:15]
    bad = tmp_path / "mpii15.json"
    bad.write_text(json.dumps(records))
    assert run(capsys, "shard", "mpii", "--images", ann.parent, "--annotations", bad, "--out", tmp_path / "o2")[0] == 0
    m = manifest(tmp_path / "o2")
    assert m["num_samples"] == 4 and m["skipped"][0]["reason"].startswith("wrong joint count")


@shared
@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_coco_mini_round_trip(tmp_path, capsys, split):
    """One sample per non-crowd person with keypoints; v 0/1/2 kept; listed-but-missing images reported."""
    ann_file = SHARED / "coco_mini" / "annotations" / f"person_keypoints_{split}.json"
    images = SHARED / "coco_mini" / split
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "shard", "coco", "--images", images, "--annotations", ann_file, "--out", out,
                            "--workers", 2, "--maxcount", 25)
    assert code == 0, err
    coco = json.loads(ann_file.read_text())
    present = set(os.listdir(images))
    listed_missing = [im["file_name"] for im in coco["images"] if im["file_name"] not in present]
    assert len(listed_missing) > 40
    m = manifest(out)
    assert m["missing_images"] == listed_missing and "images listed in the annotations are missing" in stdout
    expected = {a["id"]: a for a in coco["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0}
    assert m["num_samples"] == len(expected) and m["num_skipped"] == len(coco["annotations"]) - len(expected)
    assert sum(s["reason"] == "crowd annotation" for s in m["skipped"]) == sum(a["iscrowd"] for a in coco["annotations"])
    assert verify(str(out), progress=False) == []
    samples = dali_read(out)
    assert sorted(samples) == sorted(expected)
    for ann_id, s in samples.items():
        src = np.array(expected[ann_id]["keypoints"], dtype=np.float32).reshape(17, 3)
        np.testing.assert_array_equal(s["kp"], src)
        np.testing.assert_array_equal(s["box"], np.array(expected[ann_id]["bbox"], dtype=np.float32))
    assert {2.0, 1.0} <= {float(v) for s in samples.values() for v in s["kp"][:, 2]}


@shared
def test_coco_person_with_missing_image_is_skipped(tmp_path, capsys):
    """Only the images folder changes: a keypoint person whose image file is gone is skipped and counted."""
    ann_file = SHARED / "coco_mini" / "annotations" / "person_keypoints_val2017.json"
    images = tmp_path / "val2017"
    images.mkdir()
    for name in os.listdir(SHARED / "coco_mini" / "val2017"):
        os.symlink(SHARED / "coco_mini" / "val2017" / name, images / name)
    coco = json.loads(ann_file.read_text())
    person = next(a for a in coco["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"])
    os.remove(images / f"{person['image_id']:012d}.jpg")
    assert run(capsys, "shard", "coco", "--images", images, "--annotations", ann_file, "--out", tmp_path / "out")[0] == 0
    m = manifest(tmp_path / "out")
    missing = [s for s in m["skipped"] if s["reason"] == "image file missing"]
    assert missing and all(s["source"].endswith(f"{person['image_id']:012d}.jpg") for s in missing)
    assert f"{person['image_id']:012d}.jpg" in m["missing_images"]


def struct_array(items):
    """A MATLAB struct array (1 x n) for scipy.io.savemat, from dicts with the same fields."""
    arr = np.empty((1, len(items)), dtype=[(f, object) for f in items[0]])
    for i, item in enumerate(items):
        for f, v in item.items():
            arr[0, i][f] = v
    return arr


def test_mpii_official_mat_gives_the_json_keypoints(tmp_path, capsys):
    """The 5 MPII fixture persons written in the layout of mpii_human_pose_v1_u12_1.mat (1-based,
    RELEASE.annolist(i).annorect(j).annopoints.point) shard to the same keypoints as the JSON form;
    a person without annopoints is not a sample; one with a joint id 16 is skipped and counted."""
    ann = MPII_FIXTURE
    records = json.loads(ann.read_text())
    annolist = []
    for r in records:
        points = [{"id": j, "x": x, "y": y, "is_visible": 1}
                  for j, ((x, y), v) in enumerate(zip(r["joints"], r["joints_vis"])) if v]
        person = {"x1": 11.0, "y1": 21.0, "x2": 51.0, "y2": 71.0, "scale": r["scale"],
                  "objpos": {"x": r["center"][0], "y": r["center"][1]}, "annopoints": {"point": struct_array(points)}}
        unannotated = {**person, "annopoints": np.zeros((0, 0))}
        annolist.append({"image": {"name": r["image"]}, "annorect": struct_array([unannotated, person])})
    bad = {**person, "annopoints": {"point": struct_array([{"id": 16, "x": 1.0, "y": 1.0, "is_visible": 1}])}}
    annolist.append({"image": {"name": records[0]["image"]}, "annorect": struct_array([bad])})
    mat = tmp_path / "mpii_human_pose_v1_u12_1.mat"
    scipy.io.savemat(mat, {"RELEASE": {"annolist": struct_array(annolist), "img_train": np.ones((1, 6))}})
    assert run(capsys, "shard", "mpii", "--images", ann.parent, "--annotations", mat, "--out", tmp_path / "mat")[0] == 0
    assert run(capsys, "shard", "mpii", "--images", ann.parent, "--annotations", ann, "--out", tmp_path / "json")[0] == 0
    m = manifest(tmp_path / "mat")
    assert m["num_samples"] == 5 and [s["reason"].split(":")[0] for s in m["skipped"]] == ["wrong joint count"]
    from_mat, from_json = dali_read(tmp_path / "mat"), dali_read(tmp_path / "json")
    assert sorted(from_mat) == sorted(from_json) == [0, 1, 2, 3, 4]
    for i in from_mat:
        np.testing.assert_array_equal(from_mat[i]["kp"], from_json[i]["kp"])
        np.testing.assert_allclose(from_mat[i]["box"], from_json[i]["box"], rtol=1e-6)
    with tarfile.open(tmp_path / "mat" / "shard-000000.tar") as t:
        meta = json.loads(t.extractfile("mpii_000000.json").read())
    assert meta["head_box"] == [10.0, 20.0, 40.0, 50.0] and meta["img_train"] == 1
    assert verify(str(tmp_path / "mat"), progress=False) == []
