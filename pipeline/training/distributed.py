"""Training on several processes: torch DistributedDataParallel over one global batch (docs/design.md §3.5).

A run of N processes computes the steps of one process with the whole batch: rank r reads rows
`schedule.rank_rows(train.batch_size, r, N)` of every global batch (the data order stays a function of (seed, step)),
each loss term is this rank's share of the global batch's term (`losses.Count`: the counts that normalise a term are
summed over the ranks), and the decoder's Dropout2d draws the mask of the whole global batch on every rank and keeps
this rank's rows (`GlobalBatchDropout2d`), so all ranks' generators stay equal and the masks are those of one process.
DDP averages the ranks' gradients, so a step backpropagates `size ×` its share: the average is the sum of the shares'
gradients, the gradient of the global batch's loss.

Processes come from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`: `session` joins and
leaves the group) or from `spawn` (N processes on this machine that meet through a file in a temporary folder, so no
port is opened for the rendezvous; gloo's own sockets are bound to the loopback interface). The backend is gloo on
the CPU and nccl on CUDA, where rank r uses cuda:LOCAL_RANK.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from weclip.pipeline.errors import TrainError, WeclipError
from weclip.pipeline.training.schedule import rank_rows

LOOPBACK_INTERFACE = "lo0" if sys.platform == "darwin" else "lo"


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1, every method a no-op)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, metrics, TensorBoard events and progress bars."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """The rows of every global batch this process reads (TrainError when `size` does not divide it)."""
        return rank_rows(batch_size, self.rank, self.size)

    def sum(self, values: Tensor) -> Tensor:
        """`values` summed over the processes (a detached copy; `values` itself on one process). A `losses.Count`."""
        if self.size == 1:
            return values
        total = values.detach().clone()
        if total.device.type == "cpu" and dist.get_backend() == "nccl":  # nccl reduces CUDA tensors only
            return self.sum(total.cuda()).cpu()
        dist.all_reduce(total)
        return total

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK under several processes on CUDA (made current), else `device`."""
        if self.size == 1 or device.type != "cuda":
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise TrainError(f"training process {self.rank} needs GPU cuda:{self.local_rank}, but this machine shows "
                             f"{torch.cuda.device_count()}; run at most that many "
                             "processes per machine, or --device cpu")
        local = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(local)
        return local

    def wrap(self, decoder: nn.Module, batch_size: int) -> nn.Module:
        """The module a step runs: `decoder` itself on one process; else DDP around it, after its Dropout2d
        (`decoder.dropout`) was replaced by the global-batch one. Checkpoints keep saving `decoder`."""
        if self.size == 1:
            return decoder
        decoder.dropout = GlobalBatchDropout2d(decoder.dropout.p, self.rows(batch_size), batch_size)
        device = next(decoder.parameters()).device
        return DistributedDataParallel(decoder, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_rng(self, device: torch.device) -> None:
        """Give every rank rank 0's generator states (CPU, and this rank's CUDA device): a resumed CUDA run restores
        every device's state from rank 0's checkpoint, where only rank 0's own device state is the advanced one."""
        if self.size == 1:
            return
        states = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]
        dist.broadcast_object_list(states, src=0, device=device if device.type == "cuda" else None)
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state(states[1], device)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


class GlobalBatchDropout2d(nn.Module):
    """Dropout2d of rows `rows` of a global batch of `batch`: the channel mask is drawn for the whole global batch,
    exactly as `F.dropout2d` draws it for one process holding that batch, and this rank's rows of it are used."""

    def __init__(self, p: float, rows: slice, batch: int):
        super().__init__()
        self.p, self.rows, self.batch = p, rows, batch

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask = F.dropout2d(x.new_ones((self.batch, x.shape[1]) + (1,) * (x.dim() - 2)), self.p, True)
        return x * mask[self.rows]


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[World]:
    """This process's World: the initialised process group's (`spawn`), torchrun's (its environment names a
    world of several processes: the group is joined here and left at exit), or one process."""
    if dist.is_available() and dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World()
        return
    dist.init_process_group(backend_for(device))  # env:// from torchrun
    try:
        yield World(dist.get_rank(), size, int(os.environ.get("LOCAL_RANK", 0)))
    finally:
        dist.destroy_process_group()


def spawn(nproc: int, fn: Callable[..., Any], args: tuple = (), kwargs: dict[str, Any] | None = None,
          device: torch.device = torch.device("cpu")) -> Any:
    """Run `fn(*args, **kwargs)` in `nproc` new processes on this machine, as ranks 0..nproc-1 of one group, and
    return rank 0's result. A WeclipError in any rank is raised here as it is (the others are stopped). The CPU
    threads of this machine are shared out among the ranks."""
    if nproc < 1:
        raise TrainError(f"--nproc {nproc}: give a number of processes >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError(f"--nproc {nproc} inside a torchrun job of {os.environ['WORLD_SIZE']} processes: let "
                         "torchrun start the processes (--nproc-per-node) and drop --nproc")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    threads = max(1, torch.get_num_threads() // nproc)
    with tempfile.TemporaryDirectory(prefix="weclip-ddp-") as folder:
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        try:
            mp.start_processes(_rank_main, args=(nproc, init, backend_for(device), threads, fn, args, kwargs or {},
                                                 results), nprocs=nproc, start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            while not results.empty():
                kind, value = pickle.loads(results.get())
                if kind == "error":
                    raise value from None
            raise
    return pickle.loads(results.get())[1]  # every rank ended without error: the queue holds rank 0's result only


def _rank_main(rank: int, size: int, init: str, backend: str, threads: int, fn: Callable[..., Any], args: tuple,
               kwargs: dict[str, Any], results: Any) -> None:
    """One spawned rank: join the group, run `fn`, report rank 0's result (or any rank's WeclipError), pickled as
    bytes: torch's queues would share tensors through this process's file descriptors, gone when it exits."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size)
    dist.barrier()  # no rank may end (e.g. on an error) while another is still connecting to it
    try:
        value = fn(*args, **kwargs)
        if rank == 0:
            results.put(pickle.dumps(("result", value)))
    except WeclipError as err:
        results.put(pickle.dumps(("error", err)))
        raise
    finally:
        dist.destroy_process_group()
