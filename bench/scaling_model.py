"""A model of one training step on N GPUs over M nodes, for the full-size model and the CPU recipe's model.

    python bench/scaling_model.py [--ib-gbps 400] [--dataset-images 8000]    # the tables of docs/cluster.md
    python bench/scaling_model.py --measure [--rounds 3] [--steps 3]          # its CPU terms against 1 and 2 ranks

Data parallel, micro-batch b per GPU (each config's train.micro_batch), the global batch growing with N (weak
scaling; configs/lspet_gpu.yaml's train.global_batch 128 holds its micro-batch of 16 up to 8 GPUs only).
Terms of a step, per GPU:
  compute    b / R. R: the model alone on one GPU, 165 img/s on an H200 at 4.5 % MFU (bf16, batch 32;
             docs/gpu.md), R x 15 / 4.5 at the 15 % target; the CPU recipe's model at the same MFU, scaled by
             its FLOPs (an upper bound: a model this small is more likely bound by kernel launches). The
             backward is 2/3 of it (twice the forward's FLOPs).
  data       b / 5,874: the DALI GPU loader alone on an H200 (docs/gpu.md), prefetched, so it costs only what
             exceeds the compute; plus the new DALI pipeline each epoch (2.9 s measured there), once every
             D / (N b) steps for a training set of D images (--dataset-images; LSPET: 8,000).
  gradients  fp32 (DeepSpeed's torch_autocast keeps fp32 weights and gradients): G = 4 P bytes for P
             parameters. A ring moves (N-1)/N G per GPU for a reduce-scatter or an all-gather, twice that for
             an all-reduce. ZeRO-0 and ZeRO-1 reduce after the backward; ZeRO-2 reduce-scatters in the
             backward's hooks, beside it (overlap_comm); ZeRO-1/2 all-gather the updated fp32 weights after
             the optimizer step; ZeRO-3 all-gathers the weights in the forward and again in the backward (both
             taken as hidden behind that pass when they fit) and reduce-scatters the gradients.
  ZeRO-3's hooks  per parameter tensor, each step, on the host, waiting for its gathers: 280 us a tensor,
             measured on this project's CPU (docs/cluster.md: a ZeRO-3 step 1.83x plain torch against ZeRO-2's
             1.03x, 0.353 s plain, 1,000 tensors) and taken as the same on a GPU node's host. ZeRO-1/2's hooks
             (~10 us a tensor there) run beside the GPU's backward and are left out.
  optimizer  memory-bound: RMSprop reads and writes 20 bytes a parameter, Adam 28, at 3.35 TB/s (an H100's
             HBM3) x 0.5; ZeRO-1/2/3 each GPU updates its 1/N.
  links      NVLink within a node of 8 GPUs: 450 GB/s a direction (H100 SXM, NVLink 4), taken as the ring's
             bus bandwidth; between nodes one InfiniBand NIC per GPU (NDR 400 Gb/s = 50 GB/s; --ib-gbps 200
             for HDR), which then sets the ring's pace. Latency: 2 log2(N) x 10 us per collective (NCCL's trees).
No efficiency factor on the links: the communication times are lower bounds. Scaling efficiency is a stage's
images/s on N GPUs against N x one GPU without ZeRO (stage 0).

--measure checks the terms this machine can measure: the CPU recipe's step (fp32) in one process and in 2
ranks (gloo), against the same model: compute and optimizer timed with 2 torch threads and with 1 (2 ranks on
2 cores), the engine's own cost (DeepSpeed ZeRO-2 in one process against plain torch), and a gloo all-reduce
of the gradients between 2 processes; then DeepSpeed ZeRO-2 with 2 ranks (bench/distributed_overhead.py's
own 2-rank run). The data pipeline is not in this check (bench/train_speed.py measures it). Run it alone on
the machine: minutes of both cores.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = {"full-size": "configs/lspet_gpu.yaml", "CPU recipe": "configs/lspet_cpu.yaml"}
# measured on one H200 on 2026-12-04 (docs/gpu.md)
MODEL_ALONE_IMG_S, MODEL_ALONE_MFU = 165.0, 4.5  # the full-size model alone, bf16, batch 32
TARGET_MFU = 15.0
DALI_IMG_S = 5874.0  # the DALI GPU loader, 256x256, full training augmentation
REBUILD_S = 2.9  # a new epoch's DALI pipeline + its first batch
# assumptions (module docstring)
GPUS_PER_NODE = 8
NVLINK_GBS = 450.0
LATENCY_S = 10e-6
HBM_BYTES_S = 3.35e12 * 0.5
OPTIMIZER_BYTES = {"rmsprop": 20, "adam": 28}  # read + written per parameter by a step
OPTIMIZER_STATE = {"rmsprop": 4, "adam": 8}  # bytes of state per parameter
ZERO3_HOST_S = 280e-6  # per parameter tensor a step (measured on the CPU, module docstring)
GPU_MEMORY_BYTES = 80e9  # an H100's
GPU_COUNTS = (1, 8, 64, 256)


@dataclass
class Model:
    name: str
    config: str
    params: int
    tensors: int
    forward_flops: float
    micro_batch: int
    optimizer: str
    zero_stage: int

    @property
    def gradient_bytes(self) -> int:
        return 4 * self.params

    def images_per_s(self, mfu: float) -> float:
        """One GPU's compute rate at `mfu` %, scaled from the full-size model's measured rate by FLOPs."""
        full_flops = model_of("full-size").forward_flops
        return MODEL_ALONE_IMG_S * (mfu / MODEL_ALONE_MFU) * (full_flops / self.forward_flops)


_models: dict[str, Model] = {}


def model_of(name: str) -> Model:
    if name not in _models:
        from pipeline.config import load_config
        from pipeline.model import build_model, count_flops, count_parameters

        cfg = load_config(REPO / CONFIGS[name])
        net = build_model(cfg.model, 14, cfg.data.input_size)
        _models[name] = Model(name, CONFIGS[name], count_parameters(net), len(list(net.parameters())),
                              count_flops(net, cfg.data.input_size), cfg.train.micro_batch, cfg.train.optimizer,
                              cfg.train.zero_stage)
    return _models[name]


def link_bytes_s(gpus: int, ib_gbps: float) -> float:
    """The ring's bandwidth per GPU: NVLink inside one node, the InfiniBand NIC once it spans nodes."""
    return (NVLINK_GBS if gpus <= GPUS_PER_NODE else ib_gbps / 8) * 1e9


def collective_s(nbytes: float, gpus: int, ib_gbps: float) -> float:
    """A ring reduce-scatter or all-gather of `nbytes` over `gpus`: (N-1)/N of them through each GPU's link."""
    if gpus == 1:
        return 0.0
    return (gpus - 1) / gpus * nbytes / link_bytes_s(gpus, ib_gbps) + 2 * math.log2(gpus) * LATENCY_S


def step(m: Model, gpus: int, stage: int, mfu: float, ib_gbps: float = 400, dataset: float = 8000) -> dict:
    """One step's terms (seconds) and images/s for `gpus` GPUs at ZeRO `stage`."""
    b = m.micro_batch
    compute = b / m.images_per_s(mfu)
    forward, backward = compute / 3, 2 * compute / 3
    scatter = gather = collective_s(m.gradient_bytes, gpus, ib_gbps)  # fp32 gradients, fp32 weights: same bytes
    optimizer = OPTIMIZER_BYTES[m.optimizer] * m.params / HBM_BYTES_S
    if stage == 0:  # DeepSpeed's plain data parallel: an all-reduce after the backward
        t = forward + backward + scatter + gather + optimizer
    elif stage == 1:  # reduce-scatter after the backward, each GPU steps its 1/N, all-gather of the weights
        t = forward + backward + scatter + optimizer / gpus + gather
    elif stage == 2:  # the reduce-scatter beside the backward (overlap_comm)
        t = forward + max(backward, scatter) + optimizer / gpus + gather
    else:  # ZeRO-3: weights gathered for the forward and for the backward, gradients reduce-scattered
        t = max(forward, gather) + max(backward, gather + scatter) + optimizer / gpus + m.tensors * ZERO3_HOST_S
    data = b / DALI_IMG_S
    rebuild = REBUILD_S * gpus * b / dataset if dataset else 0.0  # one new pipeline per epoch of D / (N b) steps
    total = max(t, data) + rebuild
    host = m.tensors * ZERO3_HOST_S if stage == 3 else 0.0
    return {"compute": compute, "exchange": t - compute - host - optimizer / (1 if stage == 0 else gpus), "host": host,
            "optimizer": optimizer / (1 if stage == 0 else gpus), "data": data, "rebuild": rebuild, "step": total,
            "images_per_s": gpus * b / total}


def exchanged_bytes(m: Model, gpus: int, stage: int) -> float:
    """Bytes each GPU sends per step: 2 ring passes of G for ZeRO-0/1/2, 3 for ZeRO-3."""
    return (3 if stage == 3 else 2) * (gpus - 1) / gpus * m.gradient_bytes


def state_bytes(m: Model, gpus: int, stage: int) -> float:
    """Weights, gradients and optimizer state per GPU (fp32): what ZeRO partitions."""
    w, g, s = 4 * m.params, 4 * m.params, OPTIMIZER_STATE[m.optimizer] * m.params
    return {0: w + g + s, 1: w + g + s / gpus, 2: w + (g + s) / gpus, 3: (w + g + s) / gpus}[stage]


def efficiency(m: Model, gpus: int, stage: int, mfu: float, **kw) -> float:
    """images/s on `gpus` GPUs at ZeRO `stage` against `gpus` x one GPU without ZeRO."""
    return step(m, gpus, stage, mfu, **kw)["images_per_s"] / (gpus * step(m, 1, 0, mfu, **kw)["images_per_s"])


def where_stages_stop_paying(m: Model, mfu: float, ib_gbps: float, dataset: float) -> list[str]:
    """Each ZeRO stage against the one before it at 8 and 256 GPUs: the step time it adds, the memory it frees."""
    lines = []
    for gpus in (8, 256):
        for z in (1, 2, 3):
            dt = step(m, gpus, z, mfu, ib_gbps, dataset)["step"] - step(m, gpus, z - 1, mfu, ib_gbps, dataset)["step"]
            freed = state_bytes(m, gpus, z - 1) - state_bytes(m, gpus, z)
            lines.append(f"  {gpus} GPUs, ZeRO-{z} against ZeRO-{z - 1}: {1e3 * dt:+.1f} ms a step, frees {freed / 1e6:.0f} MB "
                         f"a GPU ({100 * freed / GPU_MEMORY_BYTES:.2f} % of 80 GB)")
    # ZeRO-3 frees the most; it is needed only when a GPU cannot hold the states of stage 2
    per_param = 4 + (4 + OPTIMIZER_STATE[m.optimizer]) / 256
    lines.append(f"  ZeRO-2 keeps {per_param:.2f} bytes a parameter per GPU at 256 GPUs: ZeRO-3 is needed past "
                 f"~{GPU_MEMORY_BYTES / 2 / per_param / 1e9:.0f} G parameters (half of 80 GB left for activations)")
    return lines


def print_tables(ib_gbps: float, dataset: float) -> None:
    print(f"Links: NVLink {NVLINK_GBS:.0f} GB/s inside a node of {GPUS_PER_NODE}, InfiniBand {ib_gbps:.0f} Gb/s "
          f"({ib_gbps / 8:.0f} GB/s) per GPU between nodes; training set {dataset:,.0f} images (an epoch's DALI "
          f"rebuild {REBUILD_S} s); DALI {DALI_IMG_S:,.0f} img/s per GPU; model alone {MODEL_ALONE_IMG_S:.0f} img/s "
          f"at {MODEL_ALONE_MFU} % MFU (H200, measured)")
    for name in CONFIGS:
        m = model_of(name)
        print(f"\n{name} ({m.config}): {m.params / 1e6:.2f} M parameters in {m.tensors} tensors, "
              f"{m.forward_flops / 1e9:.2f} GFLOPs/img forward, micro-batch {m.micro_batch}, {m.optimizer}; "
              f"fp32 gradients {m.gradient_bytes / 1e6:.1f} MB a step")
        print("| MFU | GPUs (nodes) | one GPU's compute img/s | compute ms | sent per GPU MB (ZeRO-0-2 / 3) | "
              "exposed exchange ms ZeRO-0 / 1 / 2 / 3 | rebuild ms | img/s ZeRO-0 / 1 / 2 / 3 | efficiency ZeRO-0 / 1 / 2 / 3 | "
              "ZeRO-2 without the rebuild |\n|---|---|---|---|---|---|---|---|---|---|")
        for mfu in (MODEL_ALONE_MFU, TARGET_MFU):
            for gpus in GPU_COUNTS:
                rows = [step(m, gpus, z, mfu, ib_gbps, dataset) for z in range(4)]
                exposed = [max(0.0, r["exchange"]) for r in rows]  # 0 where the backward hides it all
                effs = [efficiency(m, gpus, z, mfu, ib_gbps=ib_gbps, dataset=dataset) for z in range(4)]
                no_rebuild = efficiency(m, gpus, 2, mfu, ib_gbps=ib_gbps, dataset=0)
                nodes = max(1, gpus // GPUS_PER_NODE)
                print(f"| {mfu} % | {gpus} ({nodes}) | {m.images_per_s(mfu):,.0f} | {1e3 * rows[0]['compute']:.1f} | "
                      f"{exchanged_bytes(m, gpus, 2) / 1e6:.0f} / {exchanged_bytes(m, gpus, 3) / 1e6:.0f} | "
                      + " / ".join(f"{1e3 * e:.1f}" for e in exposed) + f" | {1e3 * rows[2]['rebuild']:.0f} | "
                      + " / ".join(f"{r['images_per_s']:,.0f}" for r in rows) + " | "
                      + " / ".join(f"{e:.2f}" for e in effs) + f" | {no_rebuild:.2f} |")
        print("\nper GPU, weights + gradients + optimizer state (fp32), MB: ZeRO-0 / 1 / 2 / 3")
        for gpus in GPU_COUNTS:
            print(f"  {gpus:3d} GPUs: " + " / ".join(f"{state_bytes(m, gpus, z) / 1e6:.0f}" for z in range(4)))
        print(f"where each stage stops paying ({MODEL_ALONE_MFU} % MFU):")
        print("\n".join(where_stages_stop_paying(m, MODEL_ALONE_MFU, ib_gbps, dataset)))


# -- --measure: the CPU terms against 1 and 2 ranks on this machine --------------------------------------------

def _allreduce_worker(rank: int, port: int, numel: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grads = torch.randn(numel)
    dist.all_reduce(grads)  # warm-up: the pair's connection
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(str(statistics.median(times)))
    dist.destroy_process_group()


def allreduce_seconds(numel: int, repeats: int = 10) -> float:
    """The median time of a gloo all-reduce of `numel` fp32 values between 2 processes on this machine."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "allreduce.txt"
    mp.spawn(_allreduce_worker, args=(port, numel, repeats, str(out)), nprocs=2)
    return float(out.read_text())


def optimizer_seconds(cfg, repeats: int = 10) -> float:
    """The config's optimizer step alone over all the model's parameters (gradients present)."""
    import torch

    from pipeline.model import build_model
    from pipeline.train import make_optimizer

    model = build_model(cfg.model, 14, cfg.data.input_size)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = make_optimizer(cfg, model.parameters())
    opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(rounds: int, steps: int) -> None:
    """The CPU recipe's step predicted from its terms and measured, in one process and in 2 ranks (ZeRO-2)."""
    import torch

    from bench import distributed_overhead as overhead
    from pipeline import distributed

    config = str(REPO / CONFIGS["CPU recipe"])
    args = argparse.Namespace(config=config, overrides=[], batch=None, rounds=rounds, steps=steps, warmup=2)
    cfg = overhead.bench_config(args)  # fp32, as the bench runs it
    args.batch = b = cfg.train.micro_batch
    cores = os.cpu_count()
    distributed.init("cpu")  # a world of one: the one-process engine needs a process group
    m = model_of("CPU recipe")
    terms = {}
    for ranks in (1, 2):
        torch.set_num_threads(max(1, cores // ranks))
        plain = statistics.median(overhead.time_interleaved({"plain": overhead.plain_torch(cfg, b)}, rounds, steps,
                                                            args.warmup)["plain"])
        opt = optimizer_seconds(cfg)
        terms[ranks] = {"compute (forward, loss, backward, clipping)": plain - opt, "optimizer": opt / ranks}
    torch.set_num_threads(cores)
    times = overhead.time_interleaved({"plain": overhead.plain_torch(cfg, b),
                                       "zero2": overhead.deepspeed_engine(cfg, 2, b)}, rounds, steps, args.warmup)
    engine = statistics.median(times["zero2"]) - statistics.median(times["plain"])
    one_process = statistics.median(times["zero2"])
    exchange = allreduce_seconds(m.params)
    for ranks in (1, 2):
        terms[ranks]["engine (DeepSpeed's hooks and flat buffers)"] = engine
        terms[ranks]["gradient all-reduce (gloo)"] = exchange if ranks == 2 else 0.0
    measured = {1: b / one_process, 2: 2 * b / statistics.median(overhead.two_ranks(args))}
    print(f"\n{m.name} ({m.config}), fp32, micro-batch {b}, ZeRO-2, {cores} cores: 1 rank x {cores} threads, "
          f"2 ranks x {max(1, cores // 2)}; {m.params / 1e6:.2f} M parameters ({m.gradient_bytes / 1e6:.1f} MB of gradients)")
    # 1 rank is the calibration (its terms are timed on one process); 2 ranks is the prediction being checked
    print("| term (seconds a step) | 1 rank (calibration) | 2 ranks (predicted) |\n|---|---|---|")
    for key in terms[1]:
        print(f"| {key} | {terms[1][key]:.4f} | {terms[2][key]:.4f} |")
    predicted = {r: r * b / sum(terms[r].values()) for r in (1, 2)}
    print(f"| predicted images/s | {predicted[1]:.1f} | {predicted[2]:.1f} |")
    print(f"| measured images/s (DeepSpeed ZeRO-2, no data) | {measured[1]:.1f} | {measured[2]:.1f} |")
    print(f"| measured / predicted | {measured[1] / predicted[1]:.2f} | {measured[2] / predicted[2]:.2f} |")
    print(f"load average now: {os.getloadavg()[0]:.1f} (other work on the machine skews every row)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ib-gbps", type=float, default=400, help="InfiniBand per GPU, Gb/s (NDR 400, HDR 200)")
    p.add_argument("--dataset-images", type=float, default=8000, help="training images (LSPET 8,000); 0: no rebuilds")
    p.add_argument("--measure", action="store_true", help="the CPU terms against 1 and 2 ranks here (minutes)")
    p.add_argument("--rounds", type=int, default=3, help="with --measure: interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="with --measure: timed steps per round")
    args = p.parse_args(argv)
    if args.measure:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return measure(args.rounds, args.steps)
    print_tables(args.ib_gbps, args.dataset_images)


if __name__ == "__main__":
    main()
