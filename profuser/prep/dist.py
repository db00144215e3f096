"""Process topology for data prep: global rank and world size from the launcher's environment.

The `deepspeed` and `torchrun` launchers both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; without a launcher the process is rank 0 of 1. Ranks never exchange tensors: each one
runs its own models on its own shards, and a gloo process group is used only for barriers and to
hand rank 0's plan to the others (so it works the same on CPU and GPU nodes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


@dataclass
class Dist:
    """Rank, world and a gloo group of the launcher's processes; barrier and broadcast over it.

    A thin layer over torch.distributed rather than accelerate's PartialState, which is a
    process-wide singleton (the Trainer started later in the same process would inherit it), picks
    NCCL on GPU nodes or, with cpu=True, puts the process on the CPU, rewrites RANK/WORLD_SIZE/MASTER_PORT
    in os.environ and resets the torch thread count; prep wants a gloo group that it closes when done.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    _owns_group: bool = False

    @classmethod
    def from_env(cls, timeout_minutes: int = 720) -> "Dist":
        d = cls(
            rank=_env_int("RANK", default=0),
            world=_env_int("WORLD_SIZE", default=1),
            local_rank=_env_int("LOCAL_RANK", default=0),
            # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
            local_world=_env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=1),
        )
        if d.world > 1:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group("gloo", rank=d.rank, world_size=d.world,
                                      timeout=timedelta(minutes=timeout_minutes))
                d._owns_group = True
        return d

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as td

            td.destroy_process_group()
            self._owns_group = False

    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""


def set_cpu_threads(dist: Dist) -> None:
    """Share the CPU cores among the local ranks (the launchers leave every rank using all of them)."""
    import torch

    if dist.local_world > 1 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world))


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port for a launcher's --master_port, chosen BELOW the kernel's ephemeral range
    (32768+ on Linux): a port from that range can be handed to some outgoing connection (gloo
    pairs, wandb) between being picked and rank 0 binding it, which kills the launch."""
    import random
    import socket

    for port in random.Random().sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in [{low}, {high})")


def remove_shm_buffers(port: int, addr: str = "127.0.0.1") -> int:
    """Delete the shared-memory allreduce buffers DeepSpeed's CPU backend leaves in /dev/shm after a
    launch on `port` (about 66 MB per rank, never removed by DeepSpeed). Returns how many went."""
    import glob

    n = 0
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"):
        try:
            os.unlink(f)
            n += 1
        except OSError:
            pass
    return n
