"""
Sharding speed on the 9,000 LSPET images of ../shared/data/lspet: `write_shards` with 1 and 2 workers
against a floor measured in the same run (stdlib tarfile, one process: read each file, add it to a tar).

    .venv/bin/python bench/shard_speed.py [--root ../shared/data/lspet] [--repeat 3]

Prints images/s per variant (best of --repeat), the wall time per image relative to the baseline, and
the CPU time per image summed over all processes (steadier than wall time on a shared machine).
Target (issue 3): >= 5,000 img/s with 2 workers, and within 2x of the baseline's time per image.
"""

import argparse
import io
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from shards.datasets import read_lspet  # noqa: E402
from shards.write import write_shards  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "lspet"


def baseline(paths, out):
    """The floor: bytes copied into one tar, nothing else."""
    with tarfile.open(os.path.join(out, "baseline.tar"), "w") as tar:
        for i, path in enumerate(paths):
            with open(path, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cpu_seconds():
    """User + system time of this process and its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best_time(fn, repeat):
    """-> (best wall seconds, CPU seconds of that run)."""
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as out:
            t0, c0 = time.perf_counter(), cpu_seconds()
            fn(out)
            runs.append((time.perf_counter() - t0, cpu_seconds() - c0))
    return min(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="LSPET folder (joints.mat, images/)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the best is reported")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    args = parser.parse_args()

    records, _, _ = read_lspet(args.root)
    paths = [r.image for r in records]
    n = len(paths)
    for path in paths:  # warm the page cache so that no variant pays for the first read
        with open(path, "rb") as f:
            f.read()
    print(f"{n} LSPET images from {args.root}, {os.cpu_count()} CPUs, best of {args.repeat}")

    base, base_cpu = best_time(lambda out: baseline(paths, out), args.repeat)
    print(f"baseline stdlib tarfile, 1 process : {n / base:8.0f} img/s  {base * 1e6 / n:5.0f} us/img wall, "
          f"{base_cpu * 1e6 / n:5.0f} us/img CPU")
    for workers in (1, 2):
        t, cpu = best_time(lambda out: write_shards(records, [], "lspet", out, maxcount=args.maxcount,
                                                    workers=workers, progress=False), args.repeat)
        print(f"shards.write_shards, {workers} worker(s)  : {n / t:8.0f} img/s  {t * 1e6 / n:5.0f} us/img wall, "
              f"{cpu * 1e6 / n:5.0f} us/img CPU, {t / base:.2f}x baseline wall time")
    print(f"2 workers: {n / t:.0f} img/s (target >= 5,000), {t / base:.2f}x the baseline's time per image "
          f"(target <= 2x)")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work skews wall times)")


if __name__ == "__main__":
    main()
