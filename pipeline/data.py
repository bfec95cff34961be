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

import dataclasses
import io
import re
import time

import numpy as np
import torch
from PIL import Image

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as e:  # the extra that matches the machine's CUDA was not installed
    raise ImportError(f"NVIDIA DALI is missing ({e}): pip install -e '.[cuda12]' (CUDA 12, and CPU-only "
                      f"machines) or -e '.[cuda13]' (CUDA 13)") from None

from pipeline.config import DataConfig
from shards.format import DALI_EXTS, IMAGE_EXT, MIN_BOX_SIDE, ShardSet

OUTPUTS = ["image", "keypoints", "flip", "matrix", "sample_id"]


def warp_interp(cfg: DataConfig, train: bool, gpu: bool) -> str:
    """linear or nn. `auto`: linear, except training crops on a CPU: there DALI's linear warp costs
    about 3.5 ms of CPU per 256x256 crop (nearest: 0.35 ms; docs/data.md), more than all the rest."""
    if cfg.interp != "auto":
        return cfg.interp
    return "nn" if train and not gpu else "linear"


def apply_gains(image, gains):
    """uint8 HWC times per-channel gains (3,), rounded and saturated to uint8."""
    return fn.crop_mirror_normalize(image, mean=[0.0, 0.0, 0.0], std=1.0 / gains, dtype=types.UINT8,
                                    output_layout="HWC")


@pipeline_def(enable_conditionals=True)
def pose_pipeline(shards: ShardSet, cfg: DataConfig, train: bool, shard_id: int, num_shards: int, gpu: bool):
    """One graph for both devices; `gpu` only picks the decoder backend and where pixels are warped."""
    jpeg, kp, box, sample_id = fn.readers.webdataset(
        paths=shards.tars, index_paths=shards.indexes, ext=DALI_EXTS,
        shard_id=shard_id, num_shards=num_shards, random_shuffle=train, initial_fill=cfg.shuffle_buffer,
        pad_last_batch=True, seed=cfg.seed, name="reader")
    # DALI 2.4's CPU numpy decoder needs C-order arrays (a Fortran-order one fails with a CUDA error);
    # the sharder writes C order and `mshg verify` checks it
    kp = fn.decoders.numpy(kp)
    box = fn.decoders.numpy(box)
    sample_id = fn.decoders.numpy(sample_id)
    hwc = fn.cast(fn.peek_image_shape(jpeg), dtype=types.FLOAT)
    wh = fn.stack(hwc[1], hwc[0])

    # -- the geometry: one matrix per sample, source continuous coordinates -> crop coordinates
    size = float(cfg.input_size)
    if train and cfg.whole_image_prob > 0:  # some crops frame the whole photo, as `mshg predict` does without a box
        whole = fn.cast(fn.random.coin_flip(probability=cfg.whole_image_prob), dtype=types.FLOAT)
        box = whole * fn.stack(wh[0] * 0.0, wh[1] * 0.0, wh[0], wh[1]) + (1.0 - whole) * box
    center = box[0:2] + box[2:4] * 0.5 + 0.5  # +0.5: pixel index -> continuous coordinates
    # crop pixels per source pixel; the side clamped as in `augment_matrix`: a 0 x 0 box (one labelled joint,
    # in shards written before the sharder skipped them) would make the zoom infinite and the keypoints NaN
    zoom = size / (dmath.max(fn.reductions.max(box[2:4]), MIN_BOX_SIDE) * cfg.padding)
    # validation: the same ops with their ranges and probabilities collapsed, so the crop is deterministic
    lo, hi = cfg.scale_range if train else (1.0, 1.0)  # lo == hi: that scale, always
    zoom = zoom / (lo + (hi - lo) * fn.random.uniform(range=[0.0, 1.0]))  # scale > 1 shows more context
    flip = fn.cast(fn.random.coin_flip(probability=cfg.flip_prob if train else 0.0), dtype=types.FLOAT)
    angle = fn.random.uniform(range=[-cfg.rotation_deg, cfg.rotation_deg]) * fn.cast(
        fn.random.coin_flip(probability=cfg.rotation_prob if train else 0.0), dtype=types.FLOAT)
    # the same chain as `augment_matrix`: centre -> origin, zoom (x negated by a flip), rotate, -> crop centre
    linear = fn.transforms.rotation(fn.transforms.scale(scale=fn.stack(zoom * (1.0 - 2.0 * flip), zoom)),
                                    angle=angle)
    matrix = fn.transforms.combine(fn.transforms.translation(offset=-center), linear,
                                   fn.transforms.translation(offset=[size / 2, size / 2]))

    # -- the pixels. Region decode: only the source window the crop can see (its four corners mapped
    # back, plus a pixel for interpolation, clipped to the image) is decoded; the warp matrix then
    # starts from that window's corner. The keypoints and the returned matrix keep full-image coordinates.
    if cfg.region_decode:
        inverse = fn.transforms.combine(
            fn.transforms.translation(offset=[-size / 2, -size / 2]),
            fn.transforms.rotation(angle=-angle),
            fn.transforms.scale(scale=fn.stack(1.0 / (zoom * (1.0 - 2.0 * flip)), 1.0 / zoom)),
            fn.transforms.translation(offset=center))
        corners = fn.coord_transform(types.Constant(np.array([[0, 0], [size, 0], [0, size], [size, size]],
                                                             np.float32)), MT=inverse)
        start = dmath.clamp(dmath.floor(fn.reductions.min(corners, axes=0)) - 1.0, 0.0, wh - 1.0)
        end = dmath.clamp(dmath.ceil(fn.reductions.max(corners, axes=0)) + 1.0, start + 1.0, wh)
        image = fn.decoders.image_slice(jpeg, start=fn.cast(start, dtype=types.INT32),
                                        end=fn.cast(end, dtype=types.INT32), device="mixed" if gpu else "cpu",
                                        output_type=types.RGB)
        warp_matrix = fn.transforms.combine(fn.transforms.translation(offset=start), matrix)
    else:
        image = fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        warp_matrix = matrix

    # Colour: per-channel gains (Newell et al.), saturated to uint8. A gain commutes with the warp, so it
    # is applied to whichever holds fewer pixels: the decoded region (person small in the crop, the
    # usual case for LSP/LSPET) or the crop (a large region zoomed out). On a CPU that saves ~0.4 ms of
    # the ~1.1 ms a sample costs (docs/data.md); on a GPU it does not matter. Per-sample `if` (DALI
    # conditionals) splits the batch and merges it again.
    jitter = train and cfg.color_jitter > 0
    if jitter:
        gains = fn.random.uniform(range=[1.0 - cfg.color_jitter, 1.0 + cfg.color_jitter], shape=[3])
        decoded = image.shape(dtype=types.FLOAT)
        colour_first = decoded[0] * decoded[1] < size * size
        if colour_first:
            image = apply_gains(image, gains)
    interp = types.INTERP_NN if warp_interp(cfg, train, gpu) == "nn" else types.INTERP_LINEAR
    image = fn.warp_affine(image, matrix=warp_matrix, size=[size, size], inverse_map=False, fill_value=0,
                           interp_type=interp)
    if jitter:
        if decoded[0] * decoded[1] >= size * size:
            image = apply_gains(image, gains)
    xy = fn.coord_transform(kp[:, 0:2] + 0.5, MT=matrix)
    keypoints = fn.cat(xy, kp[:, 2:3], axis=1)
    return image, keypoints, flip, matrix, sample_id


class BadSampleError(RuntimeError):
    """An image the pipeline could not decode, with the shard and key it came from."""


def reader_pipeline(shards: ShardSet, cfg: DataConfig, train: bool, shard_id: int, num_shards: int,
                    batch_size: int):
    """The training pipeline's reader alone, with the same arguments and seed: it yields the very same
    samples in the same order (readers are deterministic), fast, without decoding anything."""
    @pipeline_def
    def replay():
        image, = fn.readers.webdataset(
            paths=shards.tars, index_paths=shards.indexes, ext=[IMAGE_EXT], shard_id=shard_id,
            num_shards=num_shards, random_shuffle=train, initial_fill=cfg.shuffle_buffer, pad_last_batch=True,
            seed=cfg.seed, name="reader"),
        return image

    pipe = replay(batch_size=batch_size, num_threads=1, device_id=None, seed=cfg.seed)
    pipe.build()
    return pipe


def undecodable(data: bytes) -> str | None:
    """Why PIL cannot decode these image bytes, or None when it can."""
    try:
        Image.open(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return f"{type(e).__name__}: {e}"
    return None


def dali_summary(message: str) -> str:
    """DALI's multi-line error -> "operator `name`: cause" (the pipeline-definition traceback dropped)."""
    op = re.search(r"Error in \w+ operator `([^`]+)`", message)
    cause = message.split("encountered:", 1)[-1].split("Current pipeline object", 1)[0]
    cause = " ".join(line.strip() for line in cause.splitlines() if line.strip() and "C++ context" not in line)
    return f"operator `{op.group(1)}`: {cause}" if op else cause[-500:]


class PoseLoader(DALIGenericIterator):
    """DALIGenericIterator that names the shard and sample when a batch fails.

    DALI's own error says which operator failed ("nvImageCodec failure", "Invalid marker"), not which
    sample. On a failure the loader replays its reader (same seed, so the same order, without decoding)
    up to the failed batch, decodes the candidates with PIL and raises BadSampleError naming the tar
    and key, with DALI's message. The pipeline is unusable after such an error: the run must stop
    (and `mshg verify` must catch the sample before the next one)."""

    def __init__(self, pipe, replay_args: dict, prefetch: int):
        self.batches_done = 0  # pipeline runs handed out, over all epochs
        self._replay_args, self._prefetch = replay_args, prefetch
        try:
            super().__init__([pipe], OUTPUTS, reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL,
                             auto_reset=True)
        except RuntimeError as e:
            raise self.locate(e) from None

    def __next__(self):
        try:
            batch = super().__next__()
        except StopIteration:
            raise
        except RuntimeError as e:
            raise self.locate(e) from None
        self.batches_done += 1
        return batch

    def skip(self, batches: int) -> None:
        """Run and drop `batches` batches, epoch ends included, as training would have consumed them:
        a resumed run (same seed, rank and world size) then gets the very batches it would have had
        next. DALI readers cannot seek and the random ops advance per batch, so this costs what
        loading them costs (the image work included). After skipping whole epochs the loader stands
        at the start of the next one."""
        epochs, rest = divmod(batches, len(self))
        for _ in range(epochs):
            for _ in self:
                pass
        for _ in range(rest):
            next(self)

    def locate(self, error: Exception) -> Exception:
        dali_message = dali_summary(str(error))
        try:
            pipe = reader_pipeline(**self._replay_args)
            candidates = []
            for run in range(self.batches_done + self._prefetch + 2):
                images, = pipe.run()
                if run >= self.batches_done - 1:
                    candidates += [(images[i].source_info(), np.array(images[i]).tobytes())
                                   for i in range(len(images))]
            bad = []
            for info, data in dict(candidates).items():
                why = undecodable(data)
                if why:
                    tar, _, name = info.rsplit(":", 2)
                    bad.append(f"{tar} sample {name.split('.', 1)[0]} ({why})")
        except Exception as e:  # noqa: BLE001 - never hide the original error behind the search's
            return BadSampleError(f"the data pipeline failed ({dali_message}); finding the sample failed too: {e}")
        rank = self._replay_args["shard_id"]
        if not bad:
            keys = sorted({info.rsplit(":", 1)[-1].split(".", 1)[0] for info, _ in candidates})
            return BadSampleError(f"rank {rank}: the data pipeline failed after {self.batches_done} batches "
                                  f"({dali_message}); PIL decodes every image of the batches in flight "
                                  f"({', '.join(keys)}): run `mshg verify` on the shards")
        return BadSampleError(f"rank {rank}: cannot decode {'; '.join(bad)}. DALI: {dali_message}. "
                              f"Run `mshg verify` on the shard directory and re-shard without it")


def build_loader(shards: ShardSet, cfg: DataConfig, batch_size: int, train: bool, part: tuple[int, int] = (0, 1),
                 device_id: int | None = None) -> PoseLoader:
    """A DALI iterator over one part of the shards; one pass is one epoch.

    `part`: (which, of how many): the reader's share of the shards, e.g. (rank, world size). Every part
    gets the same number of batches (the reader pads its shard to the largest one and the iterator drops
    the padding from the last, partial batch), so ranks stay in step. The reader shuffles with cfg.seed,
    the random augmentations are seeded with cfg.seed + the part's index (each part its own). The same
    seed and part give the same batches again; to resume mid-epoch, skip the batches already consumed
    (`batches_done` counts them).
    """
    prefetch = 2
    shard_id, num_shards = part
    pipe = pose_pipeline(shards=shards, cfg=cfg, train=train, shard_id=shard_id, num_shards=num_shards,
                         gpu=device_id is not None, batch_size=batch_size, num_threads=cfg.num_threads,
                         device_id=device_id, seed=cfg.seed + shard_id, prefetch_queue_depth=prefetch)
    pipe.build()
    replay = dict(shards=shards, cfg=cfg, train=train, shard_id=shard_id, num_shards=num_shards, batch_size=batch_size)
    return PoseLoader(pipe, replay, prefetch)


def unpack(batch: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """DALI's batch -> tensors on the training device (images stay uint8 HWC until normalised)."""
    b = batch[0]
    return {k: b[k].to(device, non_blocking=True) for k in OUTPUTS}


class MixedBatches:
    """Training micro-batches from one shard set, or from several mixed by weight in every batch:
    `sizes[k]` samples of set k (config.mix_sizes), each set's keypoints put in the model's joint order
    (`maps[k]`, -1: not labelled by that set, so unlabelled, never background). Set 0 (data.train_shards)
    is the run's: its epochs are the run's epochs. `next()` gives the batch as tensors on `device`."""

    def __init__(self, streams: list["TrainBatches"], maps: list[list[int] | None], device: torch.device):
        self.streams, self.maps, self.device = streams, maps, device

    @property
    def epoch(self) -> int:
        return self.streams[0].epoch

    @property
    def position(self) -> int:
        return self.streams[0].position

    @property
    def drawn(self) -> int:
        return self.streams[0].drawn

    def next(self) -> dict[str, torch.Tensor]:
        parts = [unpack(s.next(), self.device) for s in self.streams]
        for part, m in zip(parts, self.maps):
            if m is not None:
                index = torch.tensor([max(i, 0) for i in m], device=self.device)
                known = torch.tensor([i >= 0 for i in m], device=self.device)[None, :, None]
                part["keypoints"] = torch.where(known, part["keypoints"][:, index], torch.zeros(()))
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self) -> dict:
        return {**self.streams[0].state_dict(), "sets": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> list[str]:
        """Each set continues where it stood; returns the notes of the sets whose position was re-derived
        (TrainBatches.load_state_dict), none for an exact resume."""
        sets = state.get("sets", [state])
        if len(sets) != len(self.streams):
            raise ValueError(f"the checkpoint mixes {len(sets)} dataset(s), the config {len(self.streams)}")
        return [note for s, st in zip(self.streams, sets) if (note := s.load_state_dict(st))]


def epoch_seed(seed: int, epoch: int) -> int:
    """The DALI seed of an epoch. Each epoch gets a freshly built pipeline with its own seed, so the
    data order of epoch e, batch b depends only on (seed, rank, e, b): a resumed run rebuilds the
    epoch's pipeline and skips the batches already trained on (DALI's shuffle buffer and random
    augmentations are a function of the seed and of the number of batches drawn)."""
    return seed + 7919 * epoch


class TrainBatches:
    """One rank's training batches, epoch after epoch: `next()` is the next micro-batch.

    `part`: (this rank, the number of ranks). Epoch e is a pipeline built with `epoch_seed(seed, e)` over
    reader shard (rank + e) % world_size, so every rank sees another part of the data each epoch and the
    order of epoch e, batch b depends only on (seed, rank, e, b). `epoch` counts the epochs completed and
    `position` the batches drawn from the current one; an epoch ends as its last batch is drawn, so a
    checkpoint taken there resumes at the start of the next epoch. A resumed run (same seed, ranks,
    micro-batch) sets both from the checkpoint and gets the very batches the uninterrupted run would have
    had next."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, batch_size: int, part: tuple[int, int] = (0, 1),
                 device_id: int | None = None, log=print):
        self.shards, self.cfg, self.batch_size = shards, cfg, batch_size
        (self.rank, self.world_size), self.device_id, self.log = part, device_id, log
        self.epoch, self.position = 0, 0
        self.drawn = 0  # micro-batches drawn over all epochs
        self.loader: PoseLoader | None = None

    def next(self) -> list[dict]:
        if self.loader is None:
            self.loader = self.build()
        batch = next(self.loader)
        self.position += 1
        self.drawn += 1
        if self.position == len(self.loader):  # the epoch's last batch
            self.epoch, self.position, self.loader = self.epoch + 1, 0, None
        return batch

    def build(self) -> PoseLoader:
        data = dataclasses.replace(self.cfg, seed=epoch_seed(self.cfg.seed, self.epoch))
        part = ((self.rank + self.epoch) % self.world_size, self.world_size)
        loader = build_loader(self.shards, data, self.batch_size, train=True, part=part, device_id=self.device_id)
        if self.position:
            t0 = time.perf_counter()
            loader.skip(self.position)
            self.log(f"epoch {self.epoch}: skipped the {self.position} batches already trained on "
                     f"in {time.perf_counter() - t0:.1f} s")
        return loader

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "drawn": self.drawn, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> str | None:
        """Continues where `state` stood. Written with another batch size or number of ranks (an elastic
        resume), the position is re-derived from the samples all ranks had drawn from the epoch: it then
        names other samples than the uninterrupted run's (some seen twice, some skipped), which the returned
        note says; None for an exact resume."""
        self.epoch, self.position, self.drawn, self.loader = state["epoch"], state["position"], state.get("drawn", 0), None
        batch, world = state.get("batch_size", self.batch_size), state.get("world_size", self.world_size)
        if (batch, world) == (self.batch_size, self.world_size):
            return None
        seen = self.position * batch * world  # samples of this epoch all ranks drew
        self.position = seen // (self.batch_size * self.world_size)
        self.drawn = state.get("drawn", 0) * batch * world // (self.batch_size * self.world_size)
        return (f"{self.shards.dataset} epoch {self.epoch}: {seen} samples drawn by {world} rank(s) x {batch} -> "
                f"position {self.position} of {self.world_size} rank(s) x {self.batch_size}")
