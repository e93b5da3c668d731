"""Named process groups (TP, EP, world) and the collectives the model uses.

This is the only module that calls torch.distributed. Model code talks to a
`Comm`; a single process gets `LocalComm`, whose collectives are identities.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import RankLayout


class LocalComm:
    """One process holds everything: every collective is a no-op."""
    tp_size = ep_size = split_size = world = 1
    tp_rank = ep_rank = split_rank = rank = 0
    ep_replicated = True

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def tp_all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def split_all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return x

    def ep_all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        return x, list(send_counts)

    def ep_all_to_all_back(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        return x

    def ep_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def ep_all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def ep_reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_ok(self, ok: bool) -> bool:
        return ok

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        return x


class StandInComm(LocalComm):
    """EP rank `ep_rank` of `ep_size` (all tokens replicated), alone: its collectives return their
    input. For checks of one rank's forward in one process (its launches and host reads on the meta
    device, kernels.aot_workloads.model_launches); the outputs are not the group's."""

    def __init__(self, ep_size: int, ep_rank: int, attn_dp: bool = False):
        """attn_dp: a rank of ep attention-DP groups of tp 1 (its own tokens): the gather returns ep
        times the rows and the reduce-scatter a 1/ep share, as the real ones do."""
        self.ep_size = self.world = ep_size
        self.ep_rank = self.rank = ep_rank
        self.split_size, self.split_rank = (1, 0) if attn_dp else (ep_size, ep_rank)
        self.ep_replicated = not attn_dp

    @classmethod
    def of(cls, me: RankLayout) -> StandInComm:
        """Rank `me` of any layout (tp > 1 too): TP collectives return what the real ones' shapes are."""
        c = cls(me.ep, me.ep_rank)
        c.tp_size, c.tp_rank, c.rank, c.world = me.tp, me.tp_rank, me.rank, me.world
        c.split_size, c.split_rank = len(me.split_ranks), me.split_rank
        c.ep_replicated = set(me.ep_ranks) <= set(me.split_ranks)  # as DistComm decides it
        return c

    def tp_all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(*[1] * (x.dim() - 1), self.tp_size) if self.tp_size > 1 else x

    def split_all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if self.split_size == 1:
            return x
        out = x.new_zeros(sum(counts), *x.shape[1:])
        lo = sum(counts[:self.split_rank])
        out[lo:lo + x.shape[0]] = x
        return out

    def ep_all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.ep_size, *[1] * (x.dim() - 1)) if self.ep_size > 1 and not self.ep_replicated else x

    def ep_reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x[: x.shape[0] // self.ep_size] if self.ep_size > 1 and not self.ep_replicated else x


@dataclass
class RendezvousSpec:
    rank: int
    world: int
    init_method: str            # e.g. "tcp://127.0.0.1:29500" or "file:///tmp/rdzv"
    backend: str | None = None  # default: nccl on CUDA, gloo on CPU


class DistComm:
    """Collectives over the TP and EP groups of one rank's layout."""

    def __init__(self, layout: list[RankLayout], rank: int, spec: RendezvousSpec, device: torch.device):
        self.me = layout[rank]
        self.rank, self.world = rank, spec.world
        self.tp_size, self.ep_size = self.me.tp, self.me.ep
        self.tp_rank, self.ep_rank = self.me.tp_rank, self.me.ep_rank
        self.split_size, self.split_rank = len(self.me.split_ranks), self.me.split_rank
        # the whole EP group holds the same tokens: the MoE may combine by all-reduce (models.layers.MoE)
        self.ep_replicated = set(self.me.ep_ranks) <= set(self.me.split_ranks)
        self.device = device
        self._a2a, self._step_times = 0.0, []
        backend = spec.backend or ("nccl" if device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=spec.init_method, rank=rank, world_size=spec.world)
        # every rank creates every group, in the same order (a torch.distributed rule)
        self.tp_group = self._groups({r.tp_ranks for r in layout})
        self.ep_group = self._groups({r.ep_ranks for r in layout})
        self.split_group = self._groups({r.split_ranks for r in layout})

    def _groups(self, sets: set[tuple[int, ...]]):
        mine = None
        for ranks in sorted(sets):
            g = dist.new_group(list(ranks))
            if self.rank in ranks:
                mine = g
        return mine

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped shards along the last dim (vocab-parallel logits)."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def split_all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate the split group's row slices (known, possibly unequal sizes)."""
        if self.split_size == 1:
            return x
        if len(set(counts)) == 1:  # equal slices (a static step's shares): one gather, no padding copies
            return _gather_rows(x, self.split_size, self.split_group)
        m = max(counts)
        pad = torch.zeros(m, *x.shape[1:], dtype=x.dtype, device=x.device)
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(self.split_size)]
        dist.all_gather(parts, pad, group=self.split_group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def take_times(self) -> list[float]:
        """All-to-all seconds per forward since the last call (the metrics poll drains it)."""
        out, self._step_times = self._step_times, []
        return out

    def end_forward(self) -> None:
        if self._a2a:
            self._step_times.append(self._a2a)
            del self._step_times[:-4096]  # nobody polling: keep a bounded tail
        self._a2a = 0.0

    def ep_all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Send rows x[...] in rank order with `send_counts`; sizes are exchanged first."""
        if self.ep_size == 1:
            return x, list(send_counts)
        t0 = time.perf_counter()
        sc = torch.tensor(send_counts, dtype=torch.long, device=x.device)
        rc = torch.empty_like(sc)
        dist.all_to_all_single(rc, sc, group=self.ep_group)
        recv_counts = rc.tolist()
        out = torch.empty(sum(recv_counts), *x.shape[1:], dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), recv_counts, list(send_counts), group=self.ep_group)
        self._a2a += time.perf_counter() - t0  # host wall time; the counts exchange syncs with the device
        return out, recv_counts

    def ep_all_to_all_back(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """The reverse trip: results return to the ranks that sent the rows."""
        if self.ep_size == 1:
            return x
        t0 = time.perf_counter()
        out = torch.empty(sum(send_counts), *x.shape[1:], dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), list(send_counts), list(recv_counts), group=self.ep_group)
        self._a2a += time.perf_counter() - t0
        return out

    def ep_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the EP group's partial MoE outputs (fixed shape, no host reads: a CUDA graph captures it)."""
        if self.ep_size > 1:
            dist.all_reduce(x, group=self.ep_group)
        return x

    def ep_all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The EP group's equal-sized row blocks, in EP rank order (fixed shape: a graph captures it)."""
        return x if self.ep_size == 1 else _gather_rows(x, self.ep_size, self.ep_group)

    def ep_reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the EP group, each rank keeping its own block of rows (the inverse of the gather)."""
        if self.ep_size == 1:
            return x
        out = torch.empty(x.shape[0] // self.ep_size, *x.shape[1:], dtype=x.dtype, device=x.device)
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
            out, x.contiguous(), group=self.ep_group)
        return out

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank says ok (a decision all ranks must take together)."""
        t = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """x from the split group's first rank to the group, in place (the sampled ids each rank's next
        step may read): rank 0 to all, or within each attention group under attention DP."""
        if self.split_size > 1:
            dist.broadcast(x, src=self.me.split_ranks[0], group=self.split_group)
        return x

    def barrier(self):
        dist.barrier()

    def shutdown(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def _gather_rows(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """The group's equal-sized row blocks concatenated in group rank order (one fixed-shape gather)."""
    out = torch.empty(size * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x.contiguous(), group=group)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env_defaults():
    # several ranks on few cores: one thread each, else OpenMP spinning stalls every collective
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
