"""
Re-read a shard directory against its manifest.json: checksums, sizes, sample counts, DALI index
files, member set of every sample, every image decodes, keypoints/boxes finite and of the right shape,
sample ids unique. Returns a list of problems, each naming the shard and sample.
"""

import hashlib
import io
import json
import os
import tarfile
import tempfile

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm
from wds2idx import IndexCreator

from shards.format import IMAGE_MEMBERS, META_MEMBER, MIN_BOX_SIDE, NPY_MEMBERS, read_manifest, read_samples


def index_matches(tar_path, idx_path):
    """The stored DALI index equals the one wds2idx builds from the tar now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = os.path.join(tmp, "fresh.idx")
        with IndexCreator(tar_path, fresh, verbose=False) as index:
            index.create_index()
        with open(fresh) as a, open(idx_path) as b:
            return a.read() == b.read()


def libjpeg_warnings(data):
    """What libjpeg says while decoding these bytes (OpenCV's decoder), or "" when nothing. A JPEG cut
    short and closed with an end-of-image marker decodes without an error, the missing part grey:
    libjpeg's "Corrupt JPEG data: premature end of data segment" warning on stderr is the only sign,
    so stderr (fd 2, where the C library writes) is captured for the decode."""
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return " ".join(err.read().decode(errors="replace").split())


def check_sample(members, num_joints):
    """Problems of one sample, given {ext: bytes}."""
    problems = []
    exts = set(members)
    images = exts & set(IMAGE_MEMBERS)
    expected = set(NPY_MEMBERS) | {META_MEMBER}
    if len(images) != 1 or exts - images != expected:
        return [f"members {sorted(exts)}, expected one of jpg/png plus {sorted(expected)}"]
    ext = images.pop()
    try:
        Image.open(io.BytesIO(members[ext])).load()  # a full decode, truncation raises
    except Exception as e:
        problems.append(f"image does not decode ({type(e).__name__}: {e})")
    else:
        if ext == "jpg" and (warning := libjpeg_warnings(members[ext])):
            problems.append(f"JPEG scan data is damaged or cut short (libjpeg: {warning})")
    arrays = {}
    for ext in sorted(NPY_MEMBERS):
        try:
            arrays[ext] = np.load(io.BytesIO(members[ext]), allow_pickle=False)
            if b"'fortran_order': True" in members[ext][:128]:
                problems.append(f"{ext} is in Fortran order (DALI's CPU numpy decoder fails on it)")
        except Exception as e:
            problems.append(f"{ext} unreadable ({e})")
    kp, box, idx = arrays.get("kp.npy"), arrays.get("box.npy"), arrays.get("idx.npy")
    if kp is not None and (kp.dtype != np.float32 or kp.shape != (num_joints, 3)):
        problems.append(f"kp.npy is {kp.dtype} {kp.shape}, expected float32 ({num_joints}, 3)")
    elif kp is not None and not np.isfinite(kp).all():
        problems.append("kp.npy holds non-finite values")
    elif kp is not None and not (kp[:, 2] > 0).any():
        problems.append("kp.npy has no labelled joint")
    if box is not None and (box.dtype != np.float32 or box.shape != (4,) or not np.isfinite(box).all()):
        problems.append(f"box.npy is {box.dtype} {box.shape} {box.tolist()}, expected 4 finite float32")
    elif box is not None and max(box[2], box[3]) < MIN_BOX_SIDE:  # the crop would divide by ~0
        problems.append(f"person box smaller than {MIN_BOX_SIDE:g} px ({box.tolist()}): re-shard with `mshg shard`, "
                        f"which skips such persons")
    if idx is not None and (idx.dtype != np.int64 or idx.shape != (1,)):
        problems.append(f"idx.npy is {idx.dtype} {idx.shape}, expected int64 (1,)")
    try:
        json.loads(members[META_MEMBER])
    except ValueError as e:
        problems.append(f"json unreadable ({e})")
    return problems


def verify(out, progress=True):
    """-> list of problem strings (empty = all good)."""
    try:
        manifest = read_manifest(out)
    except (OSError, ValueError) as e:
        return [f"manifest: {e}"]
    num_joints = len(manifest["joints"])
    problems, seen_keys, seen_ids, total = [], set(), {}, 0
    listed = {s["tar"] for s in manifest["shards"]}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: tar file not listed in manifest.json")
    bar = tqdm(total=manifest["num_samples"], unit="img", desc="verify", disable=None if progress else True)  # None: off when not a terminal
    for shard in manifest["shards"]:
        tar_path, idx_path = os.path.join(out, shard["tar"]), os.path.join(out, shard["index"])
        name = shard["tar"]
        if not os.path.isfile(tar_path):
            problems.append(f"{name}: missing")
            continue
        if os.path.getsize(tar_path) != shard["bytes"]:
            problems.append(f"{name}: {os.path.getsize(tar_path)} bytes, manifest says {shard['bytes']}")
        with open(tar_path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != shard["sha256"]:
                problems.append(f"{name}: sha256 differs from manifest")
        if not os.path.isfile(idx_path):
            problems.append(f"{name}: index {shard['index']} missing")
        else:
            try:
                if not index_matches(tar_path, idx_path):
                    problems.append(f"{name}: index {shard['index']} does not match the tar")
            except Exception as e:
                problems.append(f"{name}: cannot index the tar ({e})")
        count = 0
        try:
            for key, members in read_samples(tar_path):
                count += 1
                bar.update(1)
                if key in seen_keys:
                    problems.append(f"{name} sample {key}: key appears twice")
                seen_keys.add(key)
                problems += [f"{name} sample {key}: {p}" for p in check_sample(members, num_joints)]
                if "idx.npy" in members:
                    try:
                        sample_id = int(np.load(io.BytesIO(members["idx.npy"])).ravel()[0])
                    except Exception:
                        continue  # already reported by check_sample
                    if sample_id in seen_ids:
                        problems.append(f"{name} sample {key}: idx {sample_id} also used by {seen_ids[sample_id]}")
                    seen_ids[sample_id] = key
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{name}: unreadable tar after {count} samples ({type(e).__name__}: {e})")
        if count != shard["samples"]:
            problems.append(f"{name}: {count} samples, manifest says {shard['samples']}")
        total += count
    bar.close()
    if total != manifest["num_samples"]:
        problems.append(f"manifest: num_samples {manifest['num_samples']}, shards hold {total}")
    return problems
