"""The full-size model alone on one GPU, lever by lever: images/s, MFU and peak memory against eager.

    python bench/gpu_levers.py [--config configs/lspet_gpu.yaml] [--levers eager,compile,...] [--budget 240]
                               [--warmup 3] [--steps 10] [--batch 32] [--device auto|cuda|cpu] [key=value ...]

Each row is the eager baseline with one lever changed; the last row has every lever that can help at once:
  eager            bf16 autocast, NCHW, batch 32, cuDNN's default algorithms: the `model` row of 2026-12-04
                   (165 img/s, 4.5 % MFU on an H200, docs/gpu.md)
  fp32             no autocast (what bf16 gives)
  cudnn.benchmark  cuDNN times its algorithms for every conv shape first (the trainer turns it on)
  channels_last    NHWC model and input (the layout of cuDNN's tensor-core kernels)
  2x batch         twice the images per step (64)
  compile          torch.compile (inductor: BatchNorm, ReLU and adds fused into the convs' neighbours)
  CUDA graphs      torch.compile mode="reduce-overhead": each step replayed as CUDA graphs (static shapes);
                   CUDA only, and a measurement only: the trainer does not offer it (docs/gpu.md)
  all              cudnn.benchmark + channels_last + 2x batch + compile
A step is forward + backward + the config's optimizer (the trainer's make_optimizer) on random input; the
loss is the mean square of every module's heatmaps. MFU counts a training step as 3x the forward FLOPs
(pipeline.model.count_flops) against the GPU's dense bf16 peak. Each row: `--warmup` untimed steps (the
first one compiles), then `--steps` timed ones. Rows run in order and none starts once `--budget` seconds
are spent, nor a compiled row that the first compile's time says would not fit: the rest print as skipped.
Without a GPU (and no --device cpu) it prints "no GPU" and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
JOINTS = 14  # LSPET's
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125,
                    "B200": 2250, "RTX 4090": 165, "RTX 6000 Ada": 364}
COMPILE_GUESS_S = 120  # what a compile row is assumed to cost before one was timed


@dataclass(frozen=True)
class Lever:
    name: str
    what: str
    batch_factor: int = 1  # x --batch
    batch: int = 0  # a batch of its own (the "as trained" row of bench/gpu_smoke.py --perf); 0: the above
    bf16: bool = True
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile: str = ""  # "": eager; else torch.compile's mode ("default", "reduce-overhead")


LEVERS = [
    Lever("eager", "bf16 autocast, NCHW, cuDNN defaults"),
    Lever("fp32", "no autocast", bf16=False),
    Lever("cudnn.benchmark", "cuDNN times its conv algorithms", cudnn_benchmark=True),
    Lever("channels_last", "NHWC model and input", channels_last=True),
    Lever("2x batch", "twice the images per step", batch_factor=2),
    Lever("compile", "torch.compile (inductor)", compile="default"),
    Lever("CUDA graphs", "torch.compile mode=reduce-overhead", compile="reduce-overhead"),
    Lever("all", "cudnn.benchmark + channels_last + 2x batch + compile", batch_factor=2, channels_last=True,
          cudnn_benchmark=True, compile="default"),
]


@dataclass
class Row:
    lever: Lever
    batch: int
    images_per_s: float = 0.0
    mfu: float | None = None  # percent of the bf16 peak; None: peak unknown (a CPU)
    memory_gib: float | None = None
    first_step_s: float = 0.0  # the first step: the compile, for a compiled row
    note: str = ""  # why the row did not run, or what it found (CUDA graphs skipped)


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)


def mfu(forward_flops: float, images_per_s: float, peak: float | None) -> float | None:
    """Training FLOPs per second (forward x 3: forward + backward) as a percentage of `peak` TFLOP/s."""
    return None if not peak else 100 * 3 * forward_flops * images_per_s / (peak * 1e12)


def batch_of(lever: Lever, batch: int) -> int:
    return lever.batch or batch * lever.batch_factor


def measure(lever: Lever, cfg, batch: int, device, warmup: int, steps: int, forward_flops: float,
            peak: float | None) -> Row:
    """One lever's row: a fresh model, optimizer and input; `warmup` steps, then `steps` timed."""
    import torch

    from pipeline.model import build_model
    from pipeline.train import make_optimizer

    cuda = device.type == "cuda"
    row = Row(lever, batch)
    if lever.compile == "reduce-overhead" and not cuda:
        row.note = "skipped: CUDA graphs need CUDA"
        return row
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = lever.cudnn_benchmark
    torch._dynamo.reset()  # each compiled row compiles afresh (inductor's disk cache still serves its kernels)
    layout = torch.channels_last if lever.channels_last else torch.contiguous_format
    size = cfg.data.input_size
    model = build_model(cfg.model, JOINTS, size).to(device, memory_format=layout)
    optimizer = make_optimizer(cfg, model.parameters())
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
    forward = torch.compile(model, mode=lever.compile, dynamic=False) if lever.compile else model
    graphs = lever.compile == "reduce-overhead"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        if graphs:  # a new iteration: the graphs' outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=lever.bf16):
            loss = sum(h.float().square().mean() for h in forward(x))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    t0 = time.perf_counter()
    step()
    sync()
    row.first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    row.images_per_s = batch * steps / (time.perf_counter() - t0)
    row.mfu = mfu(forward_flops, row.images_per_s, peak)
    if cuda:
        row.memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips_before
    if graphs and skipped:  # inductor fell back to plain compiled kernels for some graphs (its log says why)
        row.note = f"CUDA graphs skipped for {skipped} graph(s)"
    del forward, model, optimizer, x
    return row


def table_header() -> str:
    return ("| lever | settings | batch | img/s | vs eager | MFU | peak memory | first step |\n"
            "|---|---|---|---|---|---|---|---|")


def table_line(row: Row, eager_rate: float | None) -> str:
    if not row.images_per_s:
        return f"| {row.lever.name} | {row.lever.what} | {row.batch} | - | - | - | - | {row.note} |"
    ratio = f"{row.images_per_s / eager_rate:.2f}x" if eager_rate else "-"
    mfu_cell = f"{row.mfu:.1f} %" if row.mfu is not None else "-"
    memory = f"{row.memory_gib:.1f} GiB" if row.memory_gib is not None else "-"
    first = f"{row.first_step_s:.1f} s" + (f"; {row.note}" if row.note else "")
    return (f"| {row.lever.name} | {row.lever.what} | {row.batch} | {row.images_per_s:,.1f} | {ratio} | {mfu_cell} "
            f"| {memory} | {first} |")


def run_levers(cfg, levers: list[Lever], device, batch: int = 32, warmup: int = 3, steps: int = 10,
               budget_s: float = 240.0, print_fn=print) -> list[Row]:
    """The rows of `levers` in order, each printed as it completes (a run stopped half-way keeps its lines)."""
    import torch

    from pipeline.model import build_model, count_flops

    flops = count_flops(build_model(cfg.model, JOINTS, cfg.data.input_size), cfg.data.input_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(name) if device.type == "cuda" else None
    compiled = sum(1 for lever in levers if lever.compile)
    images = sum((warmup + steps) * batch_of(lever, batch) for lever in levers)
    print_fn(f"{cfg.name} alone on {name}: {flops / 1e9:.3g} GFLOPs/img forward, peak "
             f"{f'{peak} TFLOP/s bf16' if peak else 'unknown (no MFU)'}; plan: {len(levers)} rows x ({warmup} warm-up + "
             f"{steps} timed steps): {images:,} images, ~{images / 165:.0f} s at the eager rate of an H200 (165 img/s), "
             f"plus {compiled} compile(s) (~{COMPILE_GUESS_S} s each until one is timed); no row starts after "
             f"{budget_s:.0f} s")
    print_fn(table_header())
    rows, start, compile_s, eager_rate = [], time.perf_counter(), None, None
    for lever in levers:
        spent = time.perf_counter() - start
        needed = (compile_s or COMPILE_GUESS_S) if lever.compile else 0
        if spent > budget_s or (lever.compile and spent + needed > budget_s):
            row = Row(lever, batch_of(lever, batch), note=f"skipped: {spent:.0f} s spent of the {budget_s:.0f} s "
                                                               f"budget" + (f", a compile takes ~{needed:.0f} s" if needed else ""))
        else:
            try:
                row = measure(lever, cfg, batch_of(lever, batch), device, warmup, steps, flops, peak)
            except Exception as e:  # noqa: BLE001 - a lever that fails is a row saying why; the others still run
                row = Row(lever, batch_of(lever, batch), note=f"FAILED: {type(e).__name__}: {str(e)[:200]}")
            if lever.compile and row.images_per_s and compile_s is None:
                compile_s = row.first_step_s
        if lever.name == "eager" and row.images_per_s:
            eager_rate = row.images_per_s
        rows.append(row)
        print_fn(table_line(row, eager_rate))
    torch._dynamo.reset()  # the last compiled row's graphs (and CUDA graph pool) go, before the stages after
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "lspet_gpu.yaml"))
    p.add_argument("--levers", default=",".join(lever.name for lever in LEVERS),
                   help="comma-separated lever names, in the order to run (default: all)")
    p.add_argument("--batch", type=int, default=32, help="the eager batch; '2x batch' and 'all' run twice it")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget", type=float, default=240, help="seconds after which no row starts")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. a smaller model)")
    args = p.parse_args(argv)
    by_name = {lever.name: lever for lever in LEVERS}
    unknown = [n for n in args.levers.split(",") if n not in by_name]
    if unknown:
        p.error(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    import torch

    if args.device == "auto" and not torch.cuda.is_available():
        print("gpu-levers: no GPU on this machine (torch.cuda.is_available() is False): nothing measured. "
              "`--device cpu` runs the rows on the CPU.")
        return 0
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    device = torch.device("cpu" if args.device == "cpu" else "cuda")
    run_levers(cfg, [by_name[n] for n in args.levers.split(",")], device, args.batch, args.warmup, args.steps,
               args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
