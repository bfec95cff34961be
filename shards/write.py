"""
Write Records into WebDataset tar shards with a DALI index per shard and a manifest.json.

Layout of {out}:
    {prefix}-000000.tar, {prefix}-000000.idx, ..., manifest.json
Each sample {key} has members {key}.jpg (or .png), {key}.kp.npy, {key}.box.npy, {key}.idx.npy,
{key}.json (see docs/shards.md). Shards are planned up front (count and size limits) so that the
output does not depend on --workers; each shard is written under a temporary name and renamed
only when complete; manifest.json is written last.
"""

import glob
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
from importlib import metadata

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm
from wds2idx import IndexCreator

from shards.datasets import DATASETS

# fixed tar metadata so that the same input gives byte-identical shards
TAR_OPTIONS = dict(user="mshg", group="mshg", mode=0o444, mtime=0, encoder=False)
PARTIAL = ".partial"  # suffix of shards and indexes still being written


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
    reported (they are annotation errors, not information)."""
    kp = np.array(kp, dtype=np.float64)
    claimed = ~(kp[:, 2] <= 0)  # NaN visibility counts as a claim so that it is reported
    finite = np.isfinite(kp).all(axis=1)
    xy = kp[:, :2]
    inside = ((xy >= -margin) & (xy <= (width - 1 + margin, height - 1 + margin))).all(axis=1)  # NaN: False
    labelled = claimed & finite & inside
    dropped = []
    for j in np.flatnonzero(claimed & ~labelled):
        if not finite[j]:
            reason = f"non-finite keypoint {kp[j].tolist()}"
        else:
            reason = f"keypoint ({xy[j, 0]:.1f}, {xy[j, 1]:.1f}) more than {margin:g} px outside the {width}x{height} image"
        dropped.append({"joint": names[j], "reason": reason})
    kp[~labelled] = 0.0
    return kp.astype(np.float32), dropped


def make_sample(record, dataset, margin, non_jpeg="png"):
    """Record -> (webdataset sample dict, dropped joints). Raises BadSample."""
    names = DATASETS[dataset].joints
    if record.keypoints.shape != (len(names), 3):
        raise BadSample(f"wrong joint count: keypoints {record.keypoints.shape}, expected ({len(names)}, 3)")
    ext, data, width, height = read_image(record.image, non_jpeg)
    kp, dropped = clean_keypoints(record.keypoints, width, height, margin, names)
    labelled = kp[:, 2] > 0
    if not labelled.any():
        raise BadSample("no labelled joints" + (f" ({len(dropped)} dropped)" if dropped else ""))
    if record.box is None:  # tight box of the labelled joints
        lo, hi = kp[labelled, :2].min(axis=0), kp[labelled, :2].max(axis=0)
        box = np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]], dtype=np.float64)
    else:
        box = np.asarray(record.box, dtype=np.float64)
    if box.shape != (4,) or not np.isfinite(box).all() or (box[2:] < 0).any():
        raise BadSample(f"bad person box {np.asarray(record.box).tolist()}")
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
        "bbox": box.tolist(),
        "head_box": record.head_box,
        "num_labelled": int(labelled.sum()),
        "dropped_joints": dropped,
        **record.extra,
    }
    sample = {
        "__key__": record.key,
        ext: data,
        "kp.npy": npy_bytes(kp),
        "box.npy": npy_bytes(box.astype(np.float32)),
        "idx.npy": npy_bytes(np.array([record.idx], dtype=np.int64)),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return sample, dropped


# -----------------------------------------------------------------------------
# one shard (runs in a worker process)


def dali_index(members, end):
    """The DALI index file that wds2idx would write, from the TarInfos of a tar we just wrote.
    wds2idx re-reads the tar with two `tar` processes (~15% of sharding time); verify and the tests
    check that both give the same bytes. None when a member has extra (pax) header blocks."""
    samples, offset = [], 0
    for info in members:
        offset += tarfile.BLOCKSIZE  # the member's header
        key, ext = info.name.split(".", 1)
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        samples[-1][1].append(f"{ext} {offset} {info.size} {info.name}")
        offset += -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if offset != end:
        return None
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(parts) + "\n" for _, parts in samples)


def write_part(task):
    """Write the planned part `number` to {out}/.{prefix}-part-{number}.tar.partial plus its index."""
    number, records, cfg = task
    pattern = os.path.join(cfg["out"], f".{cfg['prefix']}-part-%06d.tar{PARTIAL}")
    skipped, dropped, keys = [], [], []
    writer = wds.ShardWriter(pattern, maxcount=len(records) + 1, start_shard=number, verbose=0, **TAR_OPTIONS)
    tar_path, tar = writer.fname, writer.tarstream.tarstream  # the tarfile.TarFile, for the index
    try:
        for record in records:
            try:
                sample, bad_joints = make_sample(record, cfg["dataset"], cfg["margin"], cfg["non_jpeg"])
            except BadSample as e:
                skipped.append({"source": record.image, "key": record.key, "reason": str(e)})
                continue
            dropped.extend({"source": record.image, "key": record.key, **d} for d in bad_joints)
            writer.write(sample)
            keys.append(record.key)
        end = tar.offset  # end of the last member, before the end-of-archive blocks
    finally:
        writer.close()
    part = {"number": number, "tar": tar_path, "samples": len(keys), "skipped": skipped, "dropped": dropped}
    if not keys:
        os.remove(tar_path)
        return part
    part["index"] = tar_path[: -len(".tar" + PARTIAL)] + ".idx" + PARTIAL
    index = dali_index(tar.members, end)
    if index is None:
        with IndexCreator(tar_path, part["index"], verbose=False) as creator:
            creator.create_index()
    else:
        with open(part["index"], "w") as f:
            f.write(index)
    with open(tar_path, "rb") as f:
        part["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    part["bytes"] = os.path.getsize(tar_path)
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
    """Create `out`, refuse a non-empty one unless overwrite, and check that it is writable."""
    try:
        os.makedirs(out, exist_ok=True)
        existing = sorted(os.listdir(out))
    except OSError as e:
        raise ShardError(f"cannot use output directory {out}: {e.strerror or e}") from None
    if existing and not overwrite:
        raise ShardError(f"output directory {out} is not empty ({len(existing)} entries, e.g. {existing[0]}); "
                         f"pass --overwrite to replace the shards in it")
    if existing:
        # the manifest goes first: an interrupted overwrite must not leave a manifest describing stale shards
        pattern = os.path.join(glob.escape(out), "")
        ours = [os.path.join(out, "manifest.json")] + glob.glob(pattern + "*.tar") + glob.glob(pattern + "*.idx")
        for path in ours + glob.glob(pattern + f".*{PARTIAL}"):
            if os.path.isfile(path):
                os.remove(path)
    probe = os.path.join(out, f".{prefix}-write-test{PARTIAL}")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise ShardError(f"output directory {out} is not writable: {e.strerror or e}") from None


def remove_partials(out):
    for path in glob.glob(os.path.join(glob.escape(out), f".*{PARTIAL}")):
        os.remove(path)


def write_shards(records, skipped, dataset, out, prefix="shard", maxcount=1000, maxsize=1e9, workers=1,
                 overwrite=False, margin=4.0, non_jpeg="png", source=None, args=None,
                 report=None, progress=True):
    """Write all records; returns the manifest dict (also saved as {out}/manifest.json)."""
    prepare_out(out, prefix, overwrite)
    cfg = {"out": out, "prefix": prefix, "dataset": dataset, "margin": margin, "non_jpeg": non_jpeg}
    tasks = [(n, part, cfg) for n, part in enumerate(plan_parts(records, maxcount, maxsize))]
    bar = tqdm(total=len(records), unit="img", desc=f"shard {dataset}", disable=not progress, smoothing=0)
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
        remove_partials(out)
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
        os.replace(part["index"], os.path.join(out, stem + ".idx"))
        os.replace(part["tar"], os.path.join(out, stem + ".tar"))
        shards.append({"tar": stem + ".tar", "index": stem + ".idx", "samples": part["samples"],
                       "bytes": part["bytes"], "sha256": part["sha256"],
                       "first_key": part["first_key"], "last_key": part["last_key"]})
    table = DATASETS[dataset]
    manifest = {
        "dataset": dataset,
        "joints": list(table.joints),
        "flip_pairs": [list(p) for p in table.flip_pairs],
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
    tmp = os.path.join(out, f".manifest.json{PARTIAL}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "manifest.json"))
    manifest["seconds"] = seconds  # for callers; not saved, so that manifests stay byte-identical
    return manifest
