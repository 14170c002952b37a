"""torch.distributed for `quantcli train`: one process per device, started by torchrun.

    torchrun --nproc_per_node 4 -m quantcli train w/calibrated -o w/trained            # gloo, CPU
    torchrun --nproc_per_node 4 -m quantcli train w/calibrated -o w/trained --device cuda  # nccl

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR; without them training runs in one
process. Gradients are averaged by DistributedDataParallel. BN statistics and observer ranges
are buffers that every rank updates from its own shard (an exported graph has no SyncBatchNorm),
so `sync_state` reconciles them at every sync point (each checkpoint, just before BN or
observers freeze, and at the end): BN running mean and variance are averaged over ranks, observer
ranges take the envelope (min of minima, max of maxima, as one process seeing the global batch
would), and each fake quantizer's scale is recomputed. Between sync points ranks drift apart a
little in these buffers; once both are frozen every rank computes the same function, and training
matches one process with the same global batch up to floating-point summation order (tested:
relative differences around 1e-8 after 8 steps).

While BN is live it normalizes with each rank's local batch (batch_size / processes samples), which
is noisier than one process's global batch: on the digits example, 16 samples a rank at lr 0.01
lost 1-5 accuracy points where one process with 32 lost none; 32 a rank at lr 0.001 lost none.
Keep per-rank batches at 32 or more, or freeze BN early (`freeze_bn_after`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from quantcli.errors import RecipeError

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, number of processes, and its torch device."""

    rank: int
    size: int
    device: Any  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(name: str, local_rank: int) -> Any:
    import torch

    if name not in DEVICES:
        raise RecipeError(f"--device: unknown device {name!r}", f"valid: {', '.join(DEVICES)}")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError("--device cuda: CUDA is not available on this machine", "use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextlib.contextmanager
def session(device: str) -> Iterator[World]:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) if there is one; leave it after."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if size == 1 and not dist.is_initialized():
        yield World(0, 1, dev)
        return
    created = not dist.is_initialized()
    if created:
        if dev.type == "cuda":
            import torch

            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), dev)
    finally:
        if created:
            dist.destroy_process_group()


def wrap(model: Any, world: World) -> Any:
    """DistributedDataParallel over `model` when there are several processes; buffers stay per rank."""
    if world.size == 1:
        return model
    from quantcli import _torch

    return _torch.ddp(model, [world.device.index] if world.device.type == "cuda" else None)


def sync_state(prepared: Any, world: World) -> None:
    """Average BN running statistics, take the envelope of observer ranges, refresh the scales."""
    if world.size == 1:
        return
    import torch.distributed as dist

    from quantcli import _torch

    for buf in _torch.bn_buffers(prepared):
        dist.all_reduce(buf, dist.ReduceOp.SUM)
        buf.div_(world.size)
    for fq in _torch.fake_quantizers(prepared):
        obs = getattr(fq, "activation_post_process", None)
        if obs is None or not hasattr(obs, "min_val") or obs.min_val.numel() == 0:
            continue
        dist.all_reduce(obs.min_val, dist.ReduceOp.MIN)
        dist.all_reduce(obs.max_val, dist.ReduceOp.MAX)
        _torch.refresh_qparams(fq)


def gather(tensor: Any, world: World) -> Any:
    """Stack every rank's copy of `tensor` (same shape everywhere) into [world, ...] on the CPU."""
    import torch

    if world.size == 1:
        return tensor.unsqueeze(0).cpu()
    import torch.distributed as dist

    local = tensor.to(world.device)
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return torch.stack([p.cpu() for p in parts])
