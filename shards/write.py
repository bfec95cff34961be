"""
Write Records into WebDataset tar shards with a DALI index per shard and a manifest.json.

Layout of {out}:
    {prefix}-000000.tar, {prefix}-000000.idx, ..., manifest.json
Each sample {key} has five members: {key}.jpg (or .png), {key}.box.npy, {key}.idx.npy, {key}.json,
{key}.kp.npy (see docs/shards.md), in this sorted order, with fixed tar metadata, so the same input gives
byte-identical shards. Shards are planned up front (count and size limits) so that the
output does not depend on --workers; each shard is written under a temporary name and renamed
only when complete; manifest.json is written last. With --overwrite the new set is written in a staging
folder inside {out} and replaces the old set only once complete (`swap_in`).
"""

import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tarfile
import time
from importlib import metadata

import numpy as np
from PIL import Image
from tqdm import tqdm

from shards.datasets import DATASETS, Dataset
from shards.format import IMAGE_MEMBERS, META_MEMBER, MIN_BOX_SIDE, NPY_MEMBERS

PARTIAL = ".partial"  # suffix of shards and indexes still being written
STAGING = ".staging"  # suffix of the folder in --out where an --overwrite writes the new set


class ShardError(RuntimeError):
    """A problem with the output side (directory, disk); the message says what to do."""


class BadSample(Exception):
    """This sample cannot be used; the message is the reason recorded in the manifest."""


def tool_version():
    try:
        return f"mshg {metadata.version('mshg')}"
    except metadata.PackageNotFoundError:
        return "mshg (not installed)"


# -----------------------------------------------------------------------------
# one sample


NPY_HEADERS = {}  # (dtype, shape) -> .npy header bytes; np.save per array costs more than the rest of a sample


def npy_bytes(array):
    """The bytes np.save writes, always C order: DALI's CPU fn.decoders.numpy needs CUDA for Fortran order."""
    array = np.ascontiguousarray(array)
    key = (array.dtype.str, array.shape)
    if key not in NPY_HEADERS:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        NPY_HEADERS[key] = buf.getvalue()[: -array.nbytes or None]
    return NPY_HEADERS[key] + array.tobytes()


def read_image(path, non_jpeg="png"):
    """-> (ext, bytes, width, height). JPEG bytes pass through unchanged; PNG too; anything else
    becomes PNG (lossless), or, with non_jpeg="jpg", every non-JPEG becomes a quality-95 JPEG."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadSample("image file missing") from None
    except OSError as e:
        raise BadSample(f"image file unreadable: {e.strerror}") from None
    if not data:
        raise BadSample("empty image file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))  # parses the header only; `verify` decodes everything
        width, height = image.size
        if image.format != "JPEG":
            image.load()
    except Exception as e:  # PIL raises many types for broken files
        raise BadSample(f"not a readable image ({type(e).__name__}: {e})") from None
    if image.format == "JPEG":
        # a complete JPEG ends with the end-of-image marker; FF D9 cannot occur inside scan data
        if b"\xff\xd9" not in data[-64:]:
            raise BadSample("truncated JPEG (no end-of-image marker)")
        return "jpg", data, width, height
    if image.format == "PNG" and non_jpeg == "png":
        return "png", data, width, height
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") or non_jpeg == "jpg":
        image = image.convert("RGB")  # CMYK, YCbCr, float, ...: not storable as PNG / JPEG as they are
    buf = io.BytesIO()
    if non_jpeg == "jpg":
        image.save(buf, format="JPEG", quality=95)
        return "jpg", buf.getvalue(), width, height
    image.save(buf, format="PNG")
    return "png", buf.getvalue(), width, height


def clean_keypoints(kp, width, height, margin, names):
    """-> (float32 (J, 3), dropped). Unlabelled joints get x = y = v = 0; labelled joints with
    non-finite coordinates or further than `margin` px outside the image become unlabelled and are
    reported (they are annotation errors, not information). Plain floats: numpy per 14 joints costs
    more than the work."""
    rows, dropped = [], []
    for name, (x, y, v) in zip(names, np.asarray(kp, dtype=np.float64).tolist()):
        if v <= 0:  # unlabelled; NaN visibility fails this test and counts as a claim, so it is reported
            rows.append((0.0, 0.0, 0.0))
        elif not (math.isfinite(x) and math.isfinite(y) and math.isfinite(v)):
            dropped.append({"joint": name, "reason": f"non-finite keypoint {[x, y, v]}"})
            rows.append((0.0, 0.0, 0.0))
        elif not (-margin <= x <= width - 1 + margin and -margin <= y <= height - 1 + margin):
            dropped.append({"joint": name, "reason": f"keypoint ({x:.1f}, {y:.1f}) more than {margin:g} px "
                                                     f"outside the {width}x{height} image"})
            rows.append((0.0, 0.0, 0.0))
        else:
            rows.append((x, y, v))
    return np.array(rows, dtype=np.float32), dropped


def make_sample(record, dataset, margin, non_jpeg="png", names=None):
    """Record -> ({member extension: bytes}, dropped joints). Raises BadSample. `names`: the joints
    (default: the table of `dataset`)."""
    names = names or DATASETS[dataset].joints
    if record.keypoints.shape != (len(names), 3):
        raise BadSample(f"wrong joint count: keypoints {record.keypoints.shape}, expected ({len(names)}, 3)")
    ext, data, width, height = read_image(record.image, non_jpeg)
    kp, dropped = clean_keypoints(record.keypoints, width, height, margin, names)
    labelled = [(x, y) for x, y, v in kp.tolist() if v > 0]
    if not labelled:
        raise BadSample("no labelled joints" + (f" ({len(dropped)} dropped)" if dropped else ""))
    if record.box is None:  # tight box of the labelled joints
        xs, ys = zip(*labelled)
        box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    else:
        box = np.asarray(record.box, dtype=np.float64)
        box = box.tolist() if box.shape == (4,) else []
    if len(box) != 4 or not all(map(math.isfinite, box)) or box[2] < 0 or box[3] < 0:
        raise BadSample(f"bad person box {np.asarray(record.box).tolist()}")
    if max(box[2], box[3]) < MIN_BOX_SIDE:  # the crop's zoom divides by it: NaN keypoints and targets
        raise BadSample(f"person box smaller than {MIN_BOX_SIDE:g} px ({box[2]:g} x {box[3]:g}, "
                        f"{len(labelled)} labelled joint(s))")
    center = record.center if record.center is not None else [box[0] + box[2] / 2, box[1] + box[3] / 2]
    scale = record.scale if record.scale is not None else box[3] / 200.0
    meta = {
        "dataset": dataset,
        "key": record.key,
        "idx": record.idx,
        "image": record.image,
        "source_id": record.source_id,
        "format": ext,
        "width": width,
        "height": height,
        "center": [float(c) for c in center],
        "scale": float(scale),
        "bbox": box,
        "head_box": record.head_box,
        "num_labelled": len(labelled),
        "dropped_joints": dropped,
        **record.extra,
    }
    keypoints, person_box, sample_id = NPY_MEMBERS  # the member names: shards/format.py
    sample = {
        ext: data,
        keypoints: npy_bytes(kp),
        person_box: npy_bytes(np.array(box, dtype=np.float32)),
        sample_id: npy_bytes(np.array([record.idx], dtype=np.int64)),
        META_MEMBER: json.dumps(meta, sort_keys=True).encode(),
    }
    assert ext in IMAGE_MEMBERS, ext
    return sample, dropped


# -----------------------------------------------------------------------------
# one shard (runs in a worker process)


# The fixed part of every member's 512-byte ustar header, as tarfile writes it for a regular file with
# this metadata; name, size and checksum are filled in per member. test_shards checks whole shards
# byte for byte against tarfile and webdataset's TarWriter.
HEADER = bytearray(tarfile.BLOCKSIZE)
for offset, field in [(100, b"0000444\0"),  # mode 0444
                      (108, b"0000000\0"), (116, b"0000000\0"),  # uid, gid 0
                      (136, b"00000000000\0"),  # mtime 0
                      (148, b" " * 8),  # checksum field, summed as spaces
                      (156, tarfile.REGTYPE),  # a regular file
                      (257, tarfile.POSIX_MAGIC),  # "ustar\0" and version "00"
                      (265, b"mshg"), (297, b"mshg")]:  # user and group names
    HEADER[offset:offset + len(field)] = field
HEADER = bytes(HEADER)


class TarShard:
    """One tar shard being written, with the DALI index and sha256 built on the way.

    The bytes are those of tarfile's ustar format with fixed metadata (what webdataset's TarWriter
    produces, given mtime 0); written directly because tarfile's per-member Python (header objects,
    copies, stream buffering) cost ~28 us per member, 5 members a sample: over half the sharding time."""

    def __init__(self, path):
        self.path, self.file = path, open(path, "wb")
        self.sha256, self.offset, self.index = hashlib.sha256(), 0, []  # index: (key, ["ext offset size name"])

    def add(self, key, ext, data):
        name = f"{key}.{ext}"
        encoded = name.encode()
        if len(encoded) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name}")
        header = bytearray(HEADER)
        header[:len(encoded)] = encoded
        header[124:136] = b"%011o\0" % len(data)
        header[148:155] = b"%06o\0" % sum(header)  # the checksum counts its own field as 8 spaces
        if not self.index or self.index[-1][0] != key:
            self.index.append((key, []))
        self.index[-1][1].append(f"{ext} {self.offset + tarfile.BLOCKSIZE} {len(data)} {name}")  # data offset
        self._write(header + data + bytes(-len(data) % tarfile.BLOCKSIZE))

    def _write(self, data):
        self.file.write(data)
        self.sha256.update(data)
        self.offset += len(data)

    def finish(self):
        """End-of-archive (two zero blocks) and padding to a whole record, as tarfile writes them."""
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self._write(bytes(2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
        self.file.close()

    def dali_index(self):
        """What DALI's wds2idx writes for this tar (format v1.2); verify and the tests compare the two."""
        return f"v1.2 {len(self.index)}\n" + "".join(" ".join(parts) + "\n" for _, parts in self.index)


def write_part(task):
    """Write the planned part `number` to {out}/.{prefix}-part-{number}.tar.partial plus its index."""
    number, records, cfg = task
    stem = os.path.join(cfg["out"], f".{cfg['prefix']}-part-{number:06d}")
    skipped, dropped, keys = [], [], []
    tar = TarShard(f"{stem}.tar{PARTIAL}")
    try:
        for record in records:
            try:
                sample, bad_joints = make_sample(record, cfg["dataset"], cfg["margin"], cfg["non_jpeg"], cfg["joints"])
            except BadSample as e:
                skipped.append({"source": record.image, "key": record.key, "reason": str(e)})
                continue
            dropped.extend({"source": record.image, "key": record.key, **d} for d in bad_joints)
            for ext in sorted(sample):  # fixed member order: the bytes do not depend on dict order
                tar.add(record.key, ext, sample[ext])
            keys.append(record.key)
        tar.finish()
    finally:
        tar.file.close()  # also after a failed write (disk full): the caller removes the partial file
    part = {"number": number, "tar": tar.path, "samples": len(keys), "skipped": skipped, "dropped": dropped}
    if not keys:
        os.remove(tar.path)
        return part
    part["index"] = f"{stem}.idx{PARTIAL}"
    with open(part["index"], "w") as f:
        f.write(tar.dali_index())
    part["sha256"], part["bytes"] = tar.sha256.hexdigest(), tar.offset
    part["first_key"], part["last_key"] = keys[0], keys[-1]
    return part


# -----------------------------------------------------------------------------
# the whole set


def plan_parts(records, maxcount, maxsize):
    """Split records into consecutive parts of <= maxcount samples and about <= maxsize bytes,
    from file sizes on disk, so that shard contents do not depend on the number of workers."""
    parts, current, size = [], [], 0
    for record in records:
        try:
            nbytes = os.path.getsize(record.image) + 5 * 1024  # + small members and tar headers
        except OSError:
            nbytes = 0
        if current and (len(current) >= maxcount or size + nbytes > maxsize):
            parts.append(current)
            current, size = [], 0
        current.append(record)
        size += nbytes
    if current:
        parts.append(current)
    return parts


def prepare_out(out, prefix, overwrite):
    """Create `out`, refuse a non-empty one unless overwrite, and check that it is writable. -> the folder
    to write in: `out`, or, when shards are to be replaced, a staging folder inside it (`swap_in`)."""
    try:
        os.makedirs(out, exist_ok=True)
        existing = sorted(os.listdir(out))
    except OSError as e:
        raise ShardError(f"cannot use output directory {out}: {e.strerror or e}") from None
    if existing and not overwrite:
        raise ShardError(f"output directory {out} is not empty ({len(existing)} entries, e.g. {existing[0]}); "
                         f"pass --overwrite to replace the shards in it")
    target = out
    if existing:
        # nothing old is removed before the new set is complete: a re-shard that fails (disk full, a bad
        # input, Ctrl-C) keeps the old shards. The staging folder is inside `out`: the same file system
        # (renames, not copies), and no write permission needed beside it
        target = os.path.join(out, f".{prefix}{STAGING}")
        try:
            shutil.rmtree(target, ignore_errors=True)  # what a killed re-shard left
            os.mkdir(target)
        except OSError as e:
            raise ShardError(f"output directory {out} is not writable: {e.strerror or e}") from None
    probe = os.path.join(target, f".{prefix}-write-test{PARTIAL}")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise ShardError(f"output directory {out} is not writable: {e.strerror or e}") from None
    return target


def swap_in(stage, out, prefix):
    """Replace the shard set in `out` by the one complete in `stage`. Removed: the old manifest first (no
    manifest may describe a mix), then the set's files (those the old manifest lists, any {prefix}-*.tar /
    .idx, this prefix's partial files); the new files come in by rename, the manifest last. Other files in
    `out` (another set's tars, a user's notes) stay."""
    old_manifest = os.path.join(out, "manifest.json")
    try:
        with open(old_manifest) as f:
            listed = [name for s in json.load(f).get("shards", []) for name in (s.get("tar"), s.get("index"))]
    except (OSError, ValueError, AttributeError, TypeError):
        listed = []  # no manifest, or not one of ours: only the prefix's files
    pattern = os.path.join(glob.escape(out), glob.escape(prefix))
    ours = [os.path.join(out, name) for name in listed if isinstance(name, str) and os.path.basename(name) == name]
    ours += glob.glob(pattern + "-*.tar") + glob.glob(pattern + "-*.idx")
    ours += glob.glob(os.path.join(glob.escape(out), f".{glob.escape(prefix)}-*{PARTIAL}"))
    for path in [old_manifest] + ours:
        if os.path.isfile(path):
            os.remove(path)
    new = sorted(os.listdir(stage), key=lambda name: name == "manifest.json")  # the manifest last
    for name in new:
        os.replace(os.path.join(stage, name), os.path.join(out, name))
    os.rmdir(stage)


def remove_partials(out):
    for path in glob.glob(os.path.join(glob.escape(out), f".*{PARTIAL}")):
        os.remove(path)


def write_shards(records, skipped, dataset, out, prefix="shard", maxcount=1000, maxsize=1e9, workers=1,
                 overwrite=False, margin=4.0, non_jpeg="png", source=None, args=None,
                 report=None, progress=True):
    """Write all records; returns the manifest dict (also saved as {out}/manifest.json). `dataset`: a
    name of shards.datasets.DATASETS or a Dataset table (e.g. read from a COCO-format file)."""
    table = dataset if isinstance(dataset, Dataset) else DATASETS[dataset]
    dataset = table.name
    stage = prepare_out(out, prefix, overwrite)  # `out`, or a staging folder in it when replacing shards
    cfg = {"out": stage, "prefix": prefix, "dataset": dataset, "margin": margin, "non_jpeg": non_jpeg,
           "joints": list(table.joints)}
    tasks = [(n, part, cfg) for n, part in enumerate(plan_parts(records, maxcount, maxsize))]
    # disable=None: no bar (and no carriage-return frames) when the output is a file, not a terminal
    bar = tqdm(total=len(records), unit="img", desc=f"shard {dataset}", disable=None if progress else True, smoothing=0)
    parts, nskipped = [], len(skipped)
    bar.set_postfix(skipped=nskipped)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    t0 = time.time()
    try:
        results = pool.imap_unordered(write_part, tasks) if pool else map(write_part, tasks)
        for part in results:
            parts.append(part)
            nskipped += len(part["skipped"])
            bar.update(part["samples"] + len(part["skipped"]))
            bar.set_postfix(skipped=nskipped)
    except BaseException:
        if pool:
            pool.terminate()
            pool.join()
        remove_partials(stage)
        if stage != out:
            shutil.rmtree(stage, ignore_errors=True)  # the old shards stay as they were
        raise
    finally:
        bar.close()
    if pool:
        pool.close()
        pool.join()
    seconds = time.time() - t0

    # rename complete parts to consecutive shard numbers, in plan order
    parts.sort(key=lambda p: p["number"])
    shards = []
    for part in (p for p in parts if p["samples"]):
        stem = f"{prefix}-{len(shards):06d}"
        os.replace(part["index"], os.path.join(stage, stem + ".idx"))
        os.replace(part["tar"], os.path.join(stage, stem + ".tar"))
        shards.append({"tar": stem + ".tar", "index": stem + ".idx", "samples": part["samples"],
                       "bytes": part["bytes"], "sha256": part["sha256"],
                       "first_key": part["first_key"], "last_key": part["last_key"]})
    manifest = {
        "dataset": dataset,
        "joints": list(table.joints),
        "flip_pairs": [list(p) for p in table.flip_pairs],
        "skeleton": [list(p) for p in table.skeleton],
        "oks_sigmas": list(table.oks_sigmas),
        "num_samples": sum(s["samples"] for s in shards),
        "num_skipped": nskipped,
        "num_dropped_joints": sum(len(p["dropped"]) for p in parts),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "skipped": skipped + [s for p in parts for s in p["skipped"]],
        "dropped_joints": [d for p in parts for d in p["dropped"]],
        **(report or {}),
        "keypoints": "kp.npy float32 (J, 3): x, y, v in original image pixels, 0-based; v 0 = not labelled",
        "tool_version": tool_version(),
        "source": source or {},
        "args": args or {},
    }
    tmp = os.path.join(stage, f".manifest.json{PARTIAL}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(stage, "manifest.json"))
    if stage != out:  # the new set is complete: only now does it replace the old one
        swap_in(stage, out, prefix)
    manifest["seconds"] = seconds  # for callers; not saved, so that manifests stay byte-identical
    return manifest
