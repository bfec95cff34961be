"""Process-group set-up that works the same under `deepspeed`, `srun`, torchrun, or a plain `python`.

DeepSpeed's launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; `srun` sets only SLURM_* (and
`deepspeed.init_distributed` does not read them), so they are derived here; a plain process becomes
a world of one. On a machine without CUDA, DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator
(gloo); it must be set before deepspeed is imported.
"""
from __future__ import annotations

import atexit
import ctypes.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError


def torch_build() -> str:
    return f"torch {torch.__version__}" + (f" with CUDA {torch.version.cuda}" if torch.version.cuda else " built without CUDA")


def pick_device(requested: str, option: str) -> str:
    """auto | cuda | cpu -> "cuda" or "cpu", the one rule of training and inference: auto takes the GPU
    when torch sees one; cuda without CUDA is an error naming `option` (train.device, --device)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda, but CUDA is not available ({torch_build()}"
                          f"{', no GPU visible' if torch.version.cuda else ''}): install a CUDA build of torch, "
                          f"check CUDA_VISIBLE_DEVICES, or set {option}=cpu")
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def choose_device(requested: str = "auto") -> tuple[str, str]:
    """`train.device` (auto | cuda | cpu) -> ("cuda" or "cpu", why), with DeepSpeed's accelerator set to
    match (DS_ACCELERATOR, read when deepspeed first picks one). cuda without CUDA is an error, not a
    silent CPU run; auto says what it found."""
    device = pick_device(requested, "train.device")
    has_cuda = torch.cuda.is_available()
    build = torch_build()
    if device == "cuda" and os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        raise ConfigError(f"train.device={requested} chose CUDA, but DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}: "
                          f"unset it, or set train.device=cpu")
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    why = {"cuda": f"{torch.cuda.device_count() if has_cuda else 0} GPU(s) visible, {build}",
           "cpu": f"{build}" + ("" if requested == "cpu" else ", no GPU: training on the CPU over gloo")}[device]
    return device, f"train.device={requested}: {device} ({why})"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a GPU with bf16, or a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """`train.precision` (auto | bf16 | fp16 | fp32) -> what this device trains in, and why. Measured on a
    2-core AVX2 CPU (no bf16 instructions): bf16 autocast trains the CPU recipe at 2.8 img/s, fp32 at 27."""
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs GPUs (DeepSpeed has no fp16 on CPUs): use bf16 or auto")
    if requested != "auto":
        slow = requested == "bf16" and not native_bf16(device)
        return requested, f"train.precision={requested}" + (
            " (this device has no bf16 instructions: emulated, ~10x slower than fp32; auto picks fp32)" if slow else "")
    if native_bf16(device):
        return "bf16", f"train.precision=auto: bf16 ({device.type} computes bf16 in hardware)"
    return "fp32", f"train.precision=auto: fp32 ({device.type} without bf16 instructions would emulate bf16)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: 15000 + job id mod 15000, below the ephemeral range, so that
    two jobs on one node differ. launch/slurm/common.sh exports the same (tests hold the two equal)."""
    return 15000 + job_id % 15000


def fill_env_from_slurm() -> None:
    """Under srun, derive the torch.distributed variables from SLURM's, without overriding any set."""
    env = os.environ
    if "SLURM_PROCID" not in env or "RANK" in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    if "MASTER_ADDR" not in env:
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        env["MASTER_ADDR"] = nodes[0]
    env.setdefault("MASTER_PORT", str(slurm_master_port(int(env.get("SLURM_JOB_ID", "0")))))


def gpu_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank among the `visible` ones. Sites bind GPUs to SLURM tasks in one of two
    ways: one GPU per task (each task sees one device: index 0) or the node's GPUs to every task
    (each takes its LOCAL_RANK-th)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise ConfigError(f"LOCAL_RANK={local_rank}, but this task sees {visible} GPU(s) "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                      f"one rank per visible GPU, or bind one GPU to each task")


TCMALLOC = "libtcmalloc_minimal.so.4"  # Debian/Ubuntu: libtcmalloc-minimal4


def allocator_preload(choice: str, environ=os.environ) -> str | None:
    """The library the ranks of `mshg train --ranks N` preload (train.allocator), or None for glibc's malloc.
    auto: tcmalloc on CPU ranks (DS_ACCELERATOR=cpu, set by choose_device) where it is installed; a GPU run's
    host allocations are few. An LD_PRELOAD the user set is theirs: kept, nothing added."""
    if choice == "system" or environ.get("LD_PRELOAD") or (choice == "auto" and environ.get("DS_ACCELERATOR") != "cpu"):
        return None
    found = ctypes.util.find_library("tcmalloc_minimal")
    if found is None and choice == "tcmalloc":
        raise ConfigError(f"train.allocator=tcmalloc, but {TCMALLOC} is not installed (Debian/Ubuntu: apt install "
                          f"libtcmalloc-minimal4); or set train.allocator=system")
    return found


def allocator_in_use() -> str:
    """"tcmalloc" when this process runs with it (preloaded), else "glibc": for the log and the run's tags."""
    try:
        return "tcmalloc" if "libtcmalloc" in Path("/proc/self/maps").read_text() else "glibc"
    except OSError:
        return "glibc"


def launcher_devices(ranks: int, environ=os.environ) -> list[str]:
    """The DeepSpeed launcher's arguments for `ranks` ranks on this node. Its `--num_gpus N` drops
    CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1, which on a shared node belong to someone else: where
    CUDA_VISIBLE_DEVICES names the GPUs this job may use, `--include localhost:<the first N of them>`."""
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if environ.get("DS_ACCELERATOR") == "cpu" or not visible:
        return ["--num_gpus", str(ranks)]
    if len(visible) < ranks:
        raise ConfigError(f"--ranks {ranks}, but CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']} "
                          f"names {len(visible)} GPU(s)")
    return ["--include", "localhost:" + ",".join(visible[:ranks])]


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device
    device_note: str = ""  # how train.device was resolved, for the log

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """"2 rank(s) on cpu (1 thread(s) each, tcmalloc malloc)" or "8 rank(s) on cuda:0": for the log."""
        threads = (f" ({torch.get_num_threads()} thread(s) each, {allocator_in_use()} malloc)"
                   if self.device.type == "cpu" else "")
        return f"{self.size} rank(s) on {self.device}{threads}"


def use_own_ninja(env) -> None:
    """Put this Python's own bin folder (the venv's, with the `ninja` the project pins) first on PATH.
    On a CPU, DeepSpeed JIT-builds a C++ op (deepspeed_shm_comm, ~1 minute of g++ on 2 cores) into one
    shared cache with the first `ninja` on PATH. ninja >= 1.12 hashes build commands differently from older
    ones, so ranks whose launchers give them another PATH (pdsh's remote shells, srun, a system ninja
    1.11) found each other's build stale and rebuilt it in turn, on every alternation."""
    own = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(own, "ninja")) and env.get("PATH", "").split(os.pathsep)[0] != own:
        env["PATH"] = own + os.pathsep + env.get("PATH", "")


def init(device: str = "auto", cpu_threads: int = 0) -> World:
    _, note = choose_device(device)
    fill_env_from_slurm()
    env = os.environ
    if "RANK" not in env:  # a plain `python -m pipeline.train`: a world of one
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    use_own_ninja(env)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if env["WORLD_SIZE"] == "1":
        # a world of one needs no rendezvous over the network: a file store instead of a TCP store
        # (that one listens on every interface), and gloo's own pair listener kept on loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        folder = tempfile.mkdtemp(prefix="mshg-store-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        deepspeed.init_distributed(verbose=False, init_method=f"file://{folder}/store", rank=0, world_size=1)
    else:
        deepspeed.init_distributed(verbose=False)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        device = torch.device(accel.device_name(gpu_index(local_rank, torch.cuda.device_count())))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        # every rank says which GPU it drives (shared nodes, SLURM's binding)
        print(f"rank {env['RANK']} (local {local_rank}): {device} {torch.cuda.get_device_name(device)}", flush=True)
    else:
        # ranks on one CPU machine share its cores: give each its part, or they fight over them
        local_size = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or env["WORLD_SIZE"])
        torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // max(local_size, 1)))
    return World(int(env["RANK"]), local_rank, int(env["WORLD_SIZE"]), device, note)


def device_index(world: World) -> int | None:
    """The GPU of this rank for DALI (None on a CPU)."""
    return world.device.index or 0 if world.device.type == "cuda" else None


def broadcast_object(obj, world: World):
    """Rank 0's value of a picklable object, on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world: World) -> list:
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    """All ranks wait here (a world of one does not)."""
    if world.size > 1:
        torch.distributed.barrier()
