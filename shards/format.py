"""The shard format, in one place: what a sample's members are called, and the manifest reader.
`shards/write.py` writes it, `shards/verify.py` checks it, `pipeline/data.py` (DALI) reads it; outside DALI every
tar is read here (`read_samples`: the photographs, the per-sample metadata). No DALI here: evaluation, predict
and export open shard sets without it.

A sample {key} has five members: {key}.jpg (or .png), {key}.box.npy, {key}.idx.npy, {key}.json and
{key}.kp.npy (see docs/shards.md). DALI's webdataset reader names a member by everything after the
key's first dot (its `ext`).
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.datasets import skeleton_for

IMAGE_MEMBERS = ("jpg", "png")
NPY_MEMBERS = ("kp.npy", "box.npy", "idx.npy")
META_MEMBER = "json"
IMAGE_EXT = ";".join(IMAGE_MEMBERS)  # DALI: one output for either image member
DALI_EXTS = [IMAGE_EXT, *NPY_MEMBERS]  # the reader's outputs: image, keypoints, box, sample id
MANIFEST_FIELDS = ("dataset", "joints", "flip_pairs", "num_samples", "shards", "skipped")
# the smallest longer side of a person box, in pixels: the crop divides by it (a person with one labelled
# joint has a tight box of 0 x 0). The sharder skips smaller boxes, verify refuses them, the crops clamp to it
MIN_BOX_SIDE = 1.0


def read_manifest(root: str | Path) -> dict:
    """root/manifest.json, with the fields every reader relies on checked."""
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a readable manifest ({e})") from None
    missing = [name for name in MANIFEST_FIELDS if name not in manifest]
    if missing:
        raise ValueError(f"{path}: field(s) {', '.join(missing)} missing; re-shard with `mshg shard`")
    return manifest


def read_samples(tar_path, exts: tuple[str, ...] | None = None):
    """Yield (key, {ext: bytes}) in tar order; a key must not come back after another key. `exts`: only these
    members are read (the others are skipped unread), e.g. (META_MEMBER,) for the metadata alone. The one tar
    reader of the project's Python side: verify, the photographs and the metadata all read through it."""
    current, members = None, {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if key != current:
                if current is not None:
                    yield current, members
                current, members = key, {}
            if exts is None or ext in exts:
                members[ext] = tar.extractfile(info).read()
    if current is not None:
        yield current, members


def read_photos(tar_path):
    """Yield (where: "TAR: sample KEY", sample id, the image bytes as shipped, keypoints (J, 3) in original
    pixels, the person box, the sample's JSON metadata) of every sample of a tar: the photographs themselves,
    not the pipeline's crops."""
    for key, m in read_samples(tar_path):
        image = next(m[ext] for ext in IMAGE_MEMBERS if ext in m)
        arrays = {ext: np.load(io.BytesIO(m[ext])) for ext in NPY_MEMBERS}
        yield (f"{tar_path}: sample {key}", int(arrays["idx.npy"].reshape(-1)[0]), image, arrays["kp.npy"],
               arrays["box.npy"].tolist(), json.loads(m[META_MEMBER]) if META_MEMBER in m else {})


def read_metadata(shards) -> dict[int, dict]:
    """Each sample's JSON metadata of a shard set (anything with `tars`), by sample id: what DALI does not
    carry (head box, COCO image id, area, ...). Only the JSON members are read."""
    metas = {}
    for tar in shards.tars:
        for _, m in read_samples(tar, (META_MEMBER,)):
            meta = json.loads(m[META_MEMBER])
            metas[int(meta["idx"])] = meta
    return metas


@dataclass
class ShardSet:
    """A directory written by `mshg shard`: tars, DALI indexes and manifest.json."""
    root: Path
    tars: list[str]
    indexes: list[str]
    num_samples: int
    joints: list[str]
    flip_pairs: list[list[int]]
    dataset: str
    skeleton: list[list[int]]
    oks_sigmas: list[float]

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such shard directory; write shards with `mshg shard ...` first")
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; write shards with `mshg shard ...` first")
        m = read_manifest(root)
        tars = [str(root / s["tar"]) for s in m["shards"]]
        indexes = [str(root / s["index"]) for s in m["shards"]]
        for path in tars + indexes:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: listed in {manifest_path} but missing")
        for path, shard in zip(tars, m["shards"]):  # a stat: catches a cut or replaced tar before DALI does
            size = Path(path).stat().st_size
            if "bytes" in shard and size != shard["bytes"]:
                raise ValueError(f"{path}: {size} bytes, but {manifest_path} says {shard['bytes']}: the tar was cut "
                                 f"short or replaced; run `mshg verify {root}` and re-shard")
        if not int(m["num_samples"]):
            raise ValueError(f"{manifest_path}: the shard set holds no samples (see its skip report)")
        return cls(root, tars, indexes, int(m["num_samples"]), list(m["joints"]),
                   [list(p) for p in m["flip_pairs"]], m.get("dataset", "unknown"),
                   [list(p) for p in m.get("skeleton") or skeleton_for(len(m["joints"]))], list(m.get("oks_sigmas") or []))

    def flip_permutation(self) -> list[int]:
        return flip_permutation(len(self.joints), self.flip_pairs)


def flip_permutation(num_joints: int, flip_pairs: list[list[int]]) -> list[int]:
    """Joint i of a mirrored image is joint perm[i] of the original (left and right swapped)."""
    perm = list(range(num_joints))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return perm
