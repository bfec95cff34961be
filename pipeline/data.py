"""The DALI input pipeline: WebDataset tars -> person crops and their keypoints.

One graph serves both devices. On a GPU the JPEG decode is `mixed` (nvJPEG) and the warp and colour
ops run on the GPU; on a CPU-only machine (`device_id=None`) the same ops run on the CPU.

Geometry is one 2x3 affine matrix per sample, built with `fn.transforms` from the person box and the
random scale / rotation / flip. The very same matrix warps the pixels (`fn.warp_affine`) and moves the
keypoints (`fn.coord_transform`), so joints follow the pixels by construction.

Coordinates: keypoints leave the pipeline in *continuous* crop coordinates, where pixel i covers
[i, i+1) (DALI's convention); the shards hold 0-based pixel-index coordinates, hence the +0.5 below.
DALI cannot swap left/right joint labels after a flip, so the flip flag is returned and the swap is
done in torch (`pipeline.targets.swap_flipped`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.config import DataConfig

OUTPUTS = ["image", "keypoints", "flip", "matrix", "sample_id"]


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

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; write shards with `mshg shard ...` first")
        m = json.loads(manifest_path.read_text())
        tars = [str(root / s["tar"]) for s in m["shards"]]
        indexes = [str(root / s["index"]) for s in m["shards"]]
        for path in tars + indexes:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: listed in {manifest_path} but missing")
        return cls(root, tars, indexes, int(m["num_samples"]), list(m["joints"]),
                   [list(p) for p in m["flip_pairs"]], m.get("dataset", "unknown"))

    def flip_permutation(self) -> list[int]:
        perm = list(range(len(self.joints)))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm


@pipeline_def
def pose_pipeline(shards: ShardSet, cfg: DataConfig, train: bool, shard_id: int, num_shards: int, gpu: bool):
    jpeg, kp, box, sample_id = fn.readers.webdataset(
        paths=shards.tars, index_paths=shards.indexes, ext=["jpg;png", "kp.npy", "box.npy", "idx.npy"],
        shard_id=shard_id, num_shards=num_shards, random_shuffle=train, initial_fill=cfg.shuffle_buffer,
        pad_last_batch=True, seed=cfg.seed, name="reader")
    # DALI 2.4's CPU numpy decoder needs C-order arrays (a Fortran-order one fails with a CUDA error);
    # the sharder writes C order and `mshg verify` checks it
    kp = fn.decoders.numpy(kp)
    box = fn.decoders.numpy(box)
    sample_id = fn.decoders.numpy(sample_id)
    image = fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)

    size = float(cfg.input_size)
    center = box[0:2] + box[2:4] * 0.5 + 0.5  # +0.5: pixel index -> continuous coordinates
    side = fn.reductions.max(box[2:4]) * cfg.padding
    zoom = size / side  # crop pixels per source pixel
    flip = fn.cast(fn.random.coin_flip(probability=cfg.flip_prob if train else 0.0), dtype=types.FLOAT)
    matrix = fn.transforms.translation(offset=-center)
    if train:
        zoom = zoom / fn.random.uniform(range=cfg.scale_range)  # scale > 1 shows more context
    matrix = fn.transforms.scale(matrix, scale=fn.stack(zoom * (1.0 - 2.0 * flip), zoom))
    if train and cfg.rotation_deg > 0:
        angle = fn.random.uniform(range=[-cfg.rotation_deg, cfg.rotation_deg]) * fn.cast(
            fn.random.coin_flip(probability=cfg.rotation_prob), dtype=types.FLOAT)
        matrix = fn.transforms.rotation(matrix, angle=angle)
    matrix = fn.transforms.translation(matrix, offset=[size / 2, size / 2])

    if gpu:
        image = image.gpu()
    image = fn.warp_affine(image, matrix=matrix, size=[size, size], inverse_map=False,
                           fill_value=0, interp_type=types.INTERP_LINEAR)
    if train and cfg.color_jitter > 0:
        jitter = [1.0 - cfg.color_jitter, 1.0 + cfg.color_jitter]
        image = fn.color_twist(image, brightness=fn.random.uniform(range=jitter),
                               contrast=fn.random.uniform(range=jitter),
                               saturation=fn.random.uniform(range=jitter))
    xy = fn.coord_transform(kp[:, 0:2] + 0.5, MT=matrix)
    keypoints = fn.cat(xy, kp[:, 2:3], axis=1)
    return image, keypoints, flip, matrix, sample_id


def build_loader(shards: ShardSet, cfg: DataConfig, batch_size: int, train: bool,
                 rank: int = 0, world_size: int = 1, device_id: int | None = None) -> DALIGenericIterator:
    """A DALI iterator over this rank's part of the shards; one pass is one epoch.

    Every rank gets the same number of batches (the reader pads its shard to the largest one and
    the iterator drops the padding from the last, partial batch), so ranks stay in step.
    """
    pipe = pose_pipeline(shards=shards, cfg=cfg, train=train, shard_id=rank, num_shards=world_size,
                         gpu=device_id is not None, batch_size=batch_size, num_threads=cfg.num_threads,
                         device_id=device_id, seed=cfg.seed + rank, prefetch_queue_depth=2)
    pipe.build()
    return DALIGenericIterator([pipe], OUTPUTS, reader_name="reader",
                               last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)


def unpack(batch: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """DALI's batch -> tensors on the training device (images stay uint8 HWC until normalised)."""
    b = batch[0]
    return {k: b[k].to(device, non_blocking=True) for k in OUTPUTS}
