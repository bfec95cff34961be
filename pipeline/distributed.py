"""Process-group set-up that works the same under `deepspeed`, `srun`, torchrun, or a plain `python`.

DeepSpeed's launcher sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; `srun` sets only SLURM_* (and
`deepspeed.init_distributed` does not read them), so they are derived here; a plain process becomes
a world of one. On a machine without CUDA, DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator
(gloo); it must be set before deepspeed is imported.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch


def use_cpu_accelerator_if_no_gpu() -> None:
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> World:
    use_cpu_accelerator_if_no_gpu()
    fill_env_from_slurm()
    env = os.environ
    if "RANK" not in env:  # a plain `python -m pipeline.train`: a world of one
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(verbose=False)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    device = torch.device(accel.device_name(local_rank)) if accel.device_name() != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # ranks on one CPU machine share its cores: give each its part, or they fight over them
        local_size = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or env["WORLD_SIZE"])
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_size, 1)))
    return World(int(env["RANK"]), local_rank, int(env["WORLD_SIZE"]), device)


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
