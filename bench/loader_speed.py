"""
Loader speed: the DALI pipeline (full training recipe + heatmap targets) against a plain loader.

    .venv/bin/python bench/loader_speed.py [--shards DIR] [--size 256] [--images 3000] [--repeat 2]

Measured in one run on the same cores, images/s of
  (a) DALI on the CPU (`device_id=None`): `pipeline.data.build_loader(train=True)`, then the joints
      relabelled after flips and the heatmaps of all three resolutions made batched in torch on the CPU
      (`pipeline.targets`), exactly what a training step gets;
  (b) a plain loader: webdataset + PIL decode + OpenCV `warpAffine` in a torch DataLoader with as many
      worker processes as cores, doing the same crop / random scale / rotation / flip / colour jitter
      and the same heatmaps (numpy, per sample, in the workers: what public pose repositories do);
  (a') and (b'): the same with the other interpolation (DALI's default on a CPU is a nearest-neighbour
      warp for training crops, its linear warp being ~10x slower than OpenCV's; the plain loader's is
      linear), so that the ratio can be read at equal interpolation too;
  (c) DALI on the GPU (`device_id=0`, nvJPEG, warp and colour on the GPU, heatmaps in torch on the GPU)
      when there is one; without one it says so.

Without --shards it shards LSPET images 1-2000 of ../shared/data/lspet into a temporary directory.
Variants alternate --repeat times; the best run of each is reported, with the load average (other
work on the machine skews wall times).
"""

import argparse
import io
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

import torch  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import build_loader, unpack
from pipeline.inputs import augment_matrix
from shards.format import ShardSet  # noqa: E402
from pipeline.targets import make_targets, swap_flipped  # noqa: E402

DEFAULT_LSPET = REPO.parent / "shared" / "data" / "lspet"
STRIDES = [2, 2, 4, 4, 4, 4, 8, 8]  # MSC-HG: heatmaps at 1/2, 1/4 and 1/8 of the input


# -- (b) the plain loader ------------------------------------------------------------------------
class PlainPoseDataset(torch.utils.data.IterableDataset):
    """webdataset tars -> (image uint8 HWC, heatmaps per stride, joint weights), one sample at a time."""

    def __init__(self, shards: ShardSet, cfg: DataConfig, strides: list[int], seed: int):
        self.shards, self.cfg, self.strides, self.seed = shards, cfg, sorted(set(strides)), seed
        self.perm = np.array(shards.flip_permutation())

    def __iter__(self):
        import cv2
        import webdataset as wds
        from PIL import Image

        cv2.setNumThreads(1)
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(self.seed + (info.id if info else 0))
        cfg, size = self.cfg, self.cfg.input_size
        ds = wds.WebDataset(self.shards.tars, shardshuffle=False, nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker, empty_check=False).shuffle(cfg.shuffle_buffer)
        for sample in ds:
            image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            kp = np.load(io.BytesIO(sample["kp.npy"]))
            box = np.load(io.BytesIO(sample["box.npy"]))
            scale = rng.uniform(*cfg.scale_range)
            angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg) if rng.random() < cfg.rotation_prob else 0.0
            flip = rng.random() < cfg.flip_prob
            m = augment_matrix(box, size, cfg.padding, scale, angle, flip)
            m_index = m.astype(np.float64)
            m_index[:, 2] += m_index[:, :2].sum(1) * 0.5 - 0.5  # OpenCV samples at integer pixel centres
            flags = cv2.INTER_NEAREST if cfg.interp == "nn" else cv2.INTER_LINEAR
            crop = cv2.warpAffine(image, m_index, (size, size), flags=flags,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            crop = color_jitter(crop, rng, cfg.color_jitter)
            xy = (kp[:, :2] + 0.5) @ m[:, :2].T + m[:, 2]
            joints = np.concatenate([xy, kp[:, 2:3]], 1).astype(np.float32)
            if flip:
                joints = joints[self.perm]
            inside = (joints[:, 0] >= 0) & (joints[:, 0] < size) & (joints[:, 1] >= 0) & (joints[:, 1] < size)
            weights = ((joints[:, 2] > 0) & inside).astype(np.float32)
            heatmaps = {s: gaussian_heatmaps_np(joints, weights, size, s, cfg.sigma) for s in self.strides}
            yield crop, heatmaps, weights


def color_jitter(img: np.ndarray, rng, jitter: float) -> np.ndarray:
    """Per-channel gains in [1 - j, 1 + j], rounded and saturated (the pipeline's recipe), as one
    OpenCV lookup table per channel."""
    import cv2

    if jitter <= 0:
        return img
    gains = rng.uniform(1 - jitter, 1 + jitter, 3)
    table = np.clip(np.rint(np.arange(256, dtype=np.float32)[:, None] * gains), 0, 255).astype(np.uint8)
    return cv2.LUT(img, table[:, None, :])


def gaussian_heatmaps_np(joints, weights, size, stride, sigma):
    """The same Gaussians as pipeline.targets.gaussian_heatmaps, for one sample, in numpy."""
    n = size // stride
    s = sigma * 4.0 / stride
    grid = np.arange(n, dtype=np.float32)
    centre = joints[:, :2] / stride - 0.5
    gx = np.exp(-((grid - centre[:, 0:1]) ** 2) / (2 * s * s)) * weights[:, None]
    gy = np.exp(-((grid - centre[:, 1:2]) ** 2) / (2 * s * s))
    return gy[:, :, None] * gx[:, None, :]


def run_plain(shards, cfg, batch, images, workers):
    ds = PlainPoseDataset(shards, cfg, STRIDES, cfg.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=True,
                                         prefetch_factor=2)
    return timed(lambda: iter_plain(loader), images, batch)


def iter_plain(loader):
    while True:
        for crops, heatmaps, weights in loader:
            yield len(crops)


# -- (a) and (c): the DALI pipeline + targets ------------------------------------------------------
def run_dali(shards, cfg, batch, images, device_id):
    device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
    torch.set_num_threads(1)  # the cores belong to DALI's threads; torch's OpenMP threads would spin on them
    loader = build_loader(shards, cfg, batch, train=True, device_id=device_id)
    perm = shards.flip_permutation()

    def batches():
        while True:
            for raw in loader:
                b = unpack(raw, device)
                kp = swap_flipped(b["keypoints"], b["flip"], perm)
                heatmaps, weights = make_targets(kp, cfg.input_size, STRIDES, cfg.sigma)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                yield len(b["image"])

    return timed(batches, images, batch)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def timed(make_iter, images, batch, warmup=4):
    """-> (images/s wall, CPU ms per image summed over all threads and processes)."""
    it = make_iter()
    for _ in range(warmup):  # pipelines built, workers started, queues full
        next(it)
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    while n < images:
        n += next(it)
    return n / (time.perf_counter() - t0), (cpu_seconds() - c0) * 1e3 / n


def shard_lspet(root: Path, out: Path, last: int) -> Path:
    subprocess.run([sys.executable, "-m", "pipeline.cli", "shard", "lspet", "--root", str(root), "--out", str(out),
                    "--range", f"1:{last}", "--quiet"], check=True, cwd=REPO)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="a shard directory; default: LSPET 1-2000, sharded now")
    parser.add_argument("--lspet", default=str(DEFAULT_LSPET), help="LSPET folder for the default shards")
    parser.add_argument("--size", type=int, default=256, help="input size (crop side)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=3000, help="images timed per run")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant, alternating; best reported")
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="DALI threads and DataLoader workers (default: all cores)")
    parser.add_argument("--only", choices=["dali", "dali-linear", "plain", "plain-nearest"], default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards) if args.shards else shard_lspet(Path(args.lspet), Path(tmp) / "lspet", 2000)
        shards = ShardSet.open(root)
        cfg = DataConfig(input_size=args.size, num_threads=args.cores)
        print(f"{shards.num_samples} samples from {root}; input {args.size}x{args.size}, batch {args.batch}, "
              f"{args.cores} DALI threads / DataLoader workers on {os.cpu_count()} CPUs; "
              f"recipe: scale {cfg.scale_range}, rotation +-{cfg.rotation_deg} deg (p={cfg.rotation_prob}), "
              f"flip p={cfg.flip_prob}, colour +-{cfg.color_jitter}, heatmaps at strides {sorted(set(STRIDES))}")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        linear = DataConfig(**{**cfg.__dict__, "interp": "linear"})
        nearest = DataConfig(**{**cfg.__dict__, "interp": "nn"})
        variants = {"dali": lambda: run_dali(shards, cfg, args.batch, args.images, None),
                    "dali-linear": lambda: run_dali(shards, linear, args.batch, args.images, None),
                    "plain": lambda: run_plain(shards, linear, args.batch, args.images, args.cores),
                    "plain-nearest": lambda: run_plain(shards, nearest, args.batch, args.images, args.cores)}
        if args.only:
            variants = {args.only: variants[args.only]}
        best = {name: (0.0, 0.0) for name in variants}
        for r in range(args.repeat):
            for name, run in variants.items():
                v = run()
                best[name] = max(best[name], v)
                print(f"  run {r + 1}: {name:11s} {v[0]:7.0f} img/s  {v[1]:5.2f} CPU ms/img", flush=True)
        rows = {"dali": "(a) DALI CPU, full recipe + heatmaps (nearest warp) ",
                "dali-linear": "(a') the same with a linear warp                   ",
                "plain": f"(b) webdataset+PIL+OpenCV DataLoader, {args.cores} workers   ",
                "plain-nearest": "(b') the same with a nearest warp                  "}
        for name, (v, c) in best.items():
            print(f"{rows[name]}: {v:7.0f} img/s  {c:5.2f} CPU ms/img")
        for name, base in (("dali", "plain"), ("dali", "plain-nearest"), ("dali-linear", "plain")):
            (v, c), (b, bc) = best.get(name, (0.0, 0.0)), best.get(base, (0.0, 0.0))
            if v and b:
                print(f"ratio {name} / {base}: {v / b:.2f}x images/s, {bc / c:.2f}x less CPU per image"
                      + (" (target >= 1.5x at 256x256)" if (name, base) == ("dali", "plain") else ""))
        if torch.cuda.is_available():
            v, _ = run_dali(shards, cfg, args.batch, max(args.images, 10000), 0)
            print(f"(c) DALI GPU pipeline + targets (torch, GPU)      : {v:7.0f} img/s on "
                  f"{torch.cuda.get_device_name(0)} (target >= 3,000 img/s on one H100)")
        else:
            print("(c) DALI GPU: not measured, no CUDA GPU on this machine")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
