"""Scaling out: the process group, and data parallelism built from scratch (DDP, ZeRO-1 and FSDP).

    torchrun --nproc_per_node=N train.py         N copies of one script, each a "rank" with its slice of the batch
    env = init_distributed()                     rank, world size, device: NCCL on GPUs, gloo on the CPU
    model = DataParallel(model)                  DDP: the whole model on every rank, gradients averaged in backward
    opt = ShardedOptimizer(params, AdamW, ...)   ZeRO-1: each rank keeps the optimizer state of its share only
    model = FullyShardedDataParallel(model)      ZeRO-3: each rank keeps 1/N of every matrix, gathered per layer

Per rank, mixed-precision Adam needs about 16 bytes per parameter (weights, gradients, an fp32 master
copy, two moments). DDP replicates all 16; ZeRO-1 splits the 12 bytes of optimizer state over the N
ranks; FSDP splits everything. Each engine here is proved equal to single-process training on the
same global batch in tests/test_distributed.py (to the bit in fp32, where the sums can be ordered
alike). They are small on purpose: torch's own engines (`DistributedDataParallel`, FSDP2's
`fully_shard`) add the overlap, fusion and corner cases that production needs.

Every engine works on the default process group and on any `nn.Module`, not only `minillm.LLM`.
A worker process should end with `exit_worker()` (see there: gloo can abort at exit otherwise);
`run_torchrun` launches N of them from a notebook or a test and waits.

The end of the module puts torch's engines behind minillm.train's `Strategy` seam, for
`torchrun --nproc_per_node=N -m minillm train --strategy {ddp,zero1,zero2,fsdp}`: `make_strategy`
joins the process group and returns TorchDDP, TorchZero1 (DDP + ShardedOptimizer) or TorchFSDP
(FSDP2's fully_shard per block, as ZeRO-3 or ZeRO-2), each with its own checkpoint format.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# train.py imports this module only inside train(), so importing it here makes no cycle at load time.
from minillm import train as T
from minillm.model import _is_real
from minillm.train import Strategy as _Strategy

__all__ = [
    "DistributedError", "DistributedEnv", "torchrun_env", "init_distributed", "cleanup_distributed", "exit_worker",
    "run_torchrun", "DataParallel", "ShardedOptimizer", "FullyShardedDataParallel", "ShardedLinear", "ShardedEmbedding",
    "make_strategy", "TorchDDP", "TorchZero1", "TorchFSDP",
]


class DistributedError(ValueError):
    """A distributed set-up that cannot work (environment, process group, arguments); says how to fix it."""


# torch 2.13 renamed the tensor-to-tensor collectives (the old names still work, with a FutureWarning).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------------------------
# The process group


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """Who this process is: its rank among `world_size`, its rank on this node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def torchrun_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the variables torchrun sets, or None if none is set.

    torchrun sets all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Some but not all
    (a variable exported by hand, or left over from another launcher) raises DistributedError rather
    than guessing the rest: a wrong guess makes every rank wait at the rendezvous until it times out.
    """
    env = os.environ if environ is None else environ
    present = [name for name in _TORCHRUN_VARS if env.get(name, "") != ""]
    if not present:
        return None
    missing = [name for name in _TORCHRUN_VARS if name not in present]
    if missing:
        raise DistributedError(f"the torchrun environment is half set: {', '.join(present)} set, but "
                               f"{', '.join(missing)} missing; launch with `torchrun --nproc_per_node=N script.py`, "
                               f"which sets all five, or unset {', '.join(present)} to run a single process")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[name] = int(env[name])
        except ValueError:
            raise DistributedError(f"{name} must be a whole number, got {env[name]!r}; let torchrun set it") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1:
        raise DistributedError(f"WORLD_SIZE must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK must be in [0, WORLD_SIZE) = [0, {world_size}), got {rank}")
    if not 0 <= local_rank < world_size:
        raise DistributedError(f"LOCAL_RANK must be in [0, WORLD_SIZE) = [0, {world_size}), got {local_rank}")
    return rank, world_size, local_rank


def init_distributed(backend: str | None = None, timeout: timedelta | float | None = None) -> DistributedEnv:
    """Join the process group that torchrun prepared, and pick this rank's device.

    The backend is NCCL when CUDA is available (GPU to GPU over NVLink or InfiniBand) and gloo otherwise
    (CPU tensors over TCP); `backend` overrides it. On GPUs, the rank with LOCAL_RANK k uses GPU k of
    its node, set before any collective so that NCCL and every tensor land there instead of all on
    GPU 0. `timeout` (seconds or a timedelta) bounds how long a collective waits for a missing rank.
    Calling it again in the same process returns the same environment.
    """
    found = torchrun_env()
    if found is None:
        raise DistributedError("this process was not started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                               "MASTER_PORT are unset); launch it with `torchrun --nproc_per_node=N ...`, or train on "
                               "a single device without init_distributed()")
    rank, world_size, local_rank = found
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise DistributedError(f"backend must be 'nccl' (GPUs) or 'gloo' (CPU), got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("backend 'nccl' needs CUDA, which this process cannot see; "
                                   "use backend='gloo' on the CPU")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but this node shows "
                                   f"{torch.cuda.device_count()}; start at most that many processes per node "
                                   "(--nproc_per_node) or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise DistributedError(f"a process group is already set up as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, but the environment says rank {rank} of {world_size}; "
                                   "call cleanup_distributed() first")
    else:
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistributedEnv(rank, world_size, local_rank, device, dist.get_backend())


def cleanup_distributed() -> None:
    """Leave the process group, if this process is in one (the counterpart of init_distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(status: int = 0) -> NoReturn:
    """End a worker process now: flush stdout and stderr, leave the process group, exit with `status`.

    Why not just return: a gloo process can abort at interpreter exit, after all its work is done
    ("terminate called without an active exception", exit status 134), when Python tears down
    objects whose C++ threads are still attached. os._exit skips that teardown. It also skips atexit
    handlers and the flushing of open files, so write and close your results before calling it.
    """
    try:
        cleanup_distributed()
    except Exception:  # report it, but still exit: a worker that hangs here would hold up every launcher
        traceback.print_exc()
        status = status or 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def run_torchrun(
    args: Iterable[str],
    nproc: int = 2,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `torchrun --standalone --nproc_per_node=NPROC ARGS` on this machine and wait for it.

    For notebooks and tests: `args` is what follows torchrun on a command line (a script and its
    arguments, or `-m minillm train ...`). Every rank gets one CPU thread, so that N ranks share the
    cores instead of fighting over them. --standalone picks a free port for the rendezvous, so runs
    never collide. Past `timeout` seconds torchrun and its workers are killed, each worker with its
    process group (a rank that hangs in a collective must not outlive its launcher), and
    DistributedError says so; with `check`, a non-zero exit status raises DistributedError with the
    end of both output streams.
    """
    if nproc < 1:
        raise DistributedError(f"nproc={nproc}: a run needs at least one process")
    args = [str(a) for a in args]
    base = {k: v for k, v in os.environ.items() if k not in (*_TORCHRUN_VARS, "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    run_env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_torchrun(proc.pid)
        try:  # the pipes close once every process that held them is dead
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a grandchild that left its worker's process group still holds them
            proc.wait()
            out, err = "", "(none: a process outside the killed process groups still holds torchrun's output)"
        raise DistributedError(f"torchrun {' '.join(args[:3])} ... ran past {timeout:.0f} s and was killed; "
                               f"the end of its error output:\n{err[-4000:]}") from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise DistributedError(f"torchrun {' '.join(args[:3])} ... failed with exit status {done.returncode}:\n"
                               f"--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-6000:]}")
    return done


def _child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc (Linux), else from ps."""
    if os.path.isdir("/proc"):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                        stat = f.read()
                except OSError:  # ended meanwhile
                    continue
                # "pid (command) state ppid ...": the command may hold spaces and ")", so split after the last one.
                if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                    found.append(int(entry))
        return found
    listing = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, check=False).stdout
    return [int(a) for a, b in (line.split() for line in listing.splitlines() if line.strip()) if int(b) == pid]


def _kill_torchrun(pid: int) -> None:
    """SIGKILL a torchrun launcher (the leader of its own process group) and its workers.

    torchrun starts each worker in a session of its own (so that it can signal a worker's whole
    group), so killing torchrun's group would leave the workers running, holding its output pipes.
    torchrun is stopped first, so that it neither restarts nor signals a worker meanwhile; then each
    worker's group is killed, then torchrun's.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    for child in _child_pids(pid):
        for kill in (os.killpg, os.kill):  # the worker leads its group; os.kill in case it does not
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, which must exist."""
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError("no process group: call minillm.distributed.init_distributed() first, in a process started "
                               "by torchrun (or torch.distributed.init_process_group() yourself)")
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def _broadcast_from_rank0(module: nn.Module) -> None:
    # Each rank built its own copy of the model, perhaps from another seed: start them all from
    # rank 0's weights and buffers, or they part ways from the first step. (A tied tensor comes once.)
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_meta:
            raise DistributedError("the model is on the meta device; materialize it first (to_empty and reset_parameters)")
        dist.broadcast(t, src=0)


def _check_module(module: object, what: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what} wraps an nn.Module, got {type(module).__name__}")


# --------------------------------------------------------------------------------------------
# DDP from scratch


class DataParallel(nn.Module):
    """Data parallelism from scratch: every rank holds the whole model and averages its gradients.

        model = DataParallel(model, bucket_mb=25)     # rank 0's weights, broadcast to all ranks
        loss = loss_fn(model(x), y)                   # each rank its own slice of the global batch
        loss.backward()                               # all-reduces start as gradients become final ...
        model.finish_gradient_synchronization()       # ... wait for them: gradients are the mean over ranks
        optimizer.step()                              # the same update everywhere, so the copies stay equal

    How: each trainable parameter gets a post-accumulate-grad hook, which autograd calls once its
    gradient for this backward is final. With `bucket_mb=None` that hook starts an asynchronous
    all-reduce of the parameter's gradient on its own, so communication overlaps the rest of
    backward. With `bucket_mb=25`, the parameters are grouped, in reverse registration order
    (roughly the order backward finishes them), into buckets of about 25 MB; a bucket is flattened
    into one tensor and all-reduced when its last gradient arrives: fewer, larger messages, each
    paying the latency once (torch's DDP uses 25 MB buckets too).

    A tied parameter (one tensor used by two modules) is one parameter to `parameters()`, so it is
    all-reduced once, after both uses have added to its gradient. A frozen parameter
    (requires_grad=False when wrapped) is never communicated. As with torch's DDP: wrap the model
    after moving it to its device and freezing what you freeze; every rank runs the same model;
    every trainable parameter must get a gradient in each synchronized backward; and the gradients
    must be dense (no sparse embeddings).

    Gradient accumulation: run the forward of all but the last micro-batch inside `no_sync()`.
    """

    def __init__(self, module: nn.Module, bucket_mb: float | None = None) -> None:
        _check_module(module, "DataParallel")
        if bucket_mb is not None and not (_is_real(bucket_mb) and bucket_mb > 0):
            raise DistributedError(f"bucket_mb must be a positive number of megabytes, or None for one all-reduce per "
                                   f"parameter; got {bucket_mb!r}")
        _, self.world_size = _world()
        super().__init__()
        self.module = module
        self.bucket_mb = bucket_mb
        _broadcast_from_rank0(module)
        self._names = {id(p): name for name, p in module.named_parameters()}
        params = [p for p in module.parameters() if p.requires_grad]  # a tied tensor comes once
        self._params = params
        self.buckets = _make_buckets(params[::-1], bucket_mb)
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._no_sync = False  # inside the no_sync() context
        self._sync_backward = True  # decided at forward time, as torch's DDP does
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._ready:
            raise DistributedError("the previous backward's gradients are still being synchronized: call "
                                   "finish_gradient_synchronization() after each backward, before the next forward "
                                   "(for gradient accumulation, run the earlier micro-batches inside no_sync())")
        # The backward of this forward synchronizes unless it ran inside no_sync(). Deciding here, not
        # in backward, lets a loop call backward outside the context (as train.train_step does).
        self._sync_backward = not self._no_sync
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forwards inside skip the all-reduce in their backward: gradients add up locally, and the
        first backward of a forward outside all-reduces the sum (gradient accumulation)."""
        before, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = before

    def _reset(self) -> None:
        self._ready: set[int] = set()  # ids of the parameters whose gradient is final in this backward
        self._filled = [0] * len(self.buckets)  # how many of each bucket's parameters are ready
        self._launched = 0  # buckets 0 .. _launched - 1 have been all-reduced (or are under way)
        self._pending: list[tuple[int, Tensor, dist.Work]] = []  # (bucket, tensor being reduced, handle)

    def _grad_ready(self, p: Tensor) -> None:
        """The post-accumulate-grad hook: p.grad is final for this backward."""
        if not self._sync_backward:
            return
        if id(p) in self._ready:
            raise DistributedError(f"the gradient of {self._names[id(p)]!r} became ready twice in one synchronized "
                                   "backward; call finish_gradient_synchronization() after each backward, or "
                                   "accumulate inside no_sync()")
        self._ready.add(id(p))
        b = self._bucket_of[id(p)]
        self._filled[b] += 1
        # Collectives pair up across ranks by the order in which they are issued, so buckets go out in
        # index order on every rank, even if one fills early (a layer registered late but used first).
        while self._launched < len(self.buckets) and self._filled[self._launched] == len(self.buckets[self._launched]):
            self._launch(self._launched)
            self._launched += 1

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        if len(bucket) == 1 and bucket[0].grad.is_contiguous():
            flat = bucket[0].grad  # a bucket of one: reduce the gradient in place, no copy
        else:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        self._pending.append((b, flat, dist.all_reduce(flat, async_op=True)))

    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        """Wait for this backward's all-reduces and turn the summed gradients into their mean.

        Call it after backward and before clipping or the optimizer step. After a backward whose
        forward ran inside no_sync() there is nothing to do, and it returns at once.
        """
        pending, ready = self._pending, self._ready
        self._reset()
        for b, flat, work in pending:
            work.wait()
            flat.div_(self.world_size)  # the sum over ranks becomes the mean (exact for a power-of-2 world size)
            bucket = self.buckets[b]
            if flat is not bucket[0].grad:
                for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
                    p.grad.copy_(g.view_as(p.grad))
        missing = [self._names[id(p)] for p in self._params if id(p) not in ready]
        if ready and missing:
            raise DistributedError(f"no gradient reached {missing} in this backward, so they were not synchronized; "
                                   "every trainable parameter must get a gradient in each step: freeze unused ones "
                                   "with requires_grad_(False) before wrapping")

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}, buckets={len(self.buckets)}, bucket_mb={self.bucket_mb}"


def _make_buckets(params: list[Tensor], bucket_mb: float | None) -> list[list[Tensor]]:
    """Consecutive parameters, grouped up to about `bucket_mb` MB (one each for None)."""
    if bucket_mb is None:
        return [[p] for p in params]
    cap = bucket_mb * 2**20
    buckets: list[list[Tensor]] = []
    size = 0
    for p in params:
        # One flat tensor holds one dtype on one device: a change of either starts a new bucket.
        if not buckets or size >= cap or (p.dtype, p.device) != (buckets[-1][0].dtype, buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * p.element_size()
    return buckets


# --------------------------------------------------------------------------------------------
# ZeRO-1: a sharded optimizer


def _partition(sizes: list[int], world_size: int, loads: list[int] | None = None) -> list[int]:
    """The rank that owns each tensor: largest first, each to the rank with the fewest elements so far
    (ties to the lowest rank). Deterministic, so every rank computes the same answer on its own."""
    loads = [0] * world_size if loads is None else list(loads)
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += sizes[i]
    return owners


def _options(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 from scratch: each rank keeps the optimizer state of its share of the parameters.

        optimizer = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=3e-4, weight_decay=0.1)

    In mixed-precision Adam training the optimizer holds 12 of the 16 bytes per parameter (an fp32
    master copy and two moments); split over N ranks, they cost 12/N. The parameters are partitioned across the ranks as
    whole tensors, balanced by their number of elements (largest first, each to the rank with the
    fewest so far: the same answer on every rank, with no communication). Each rank builds
    `optimizer_cls(..., **kwargs)` over its share only, so only its share has state. `step()` steps
    that local optimizer, which updates this rank's share, then broadcasts each updated parameter
    from the rank that owns it: every rank ends the step with the whole updated model.

    Use it with full, averaged gradients on every rank (for instance after DataParallel's
    finish_gradient_synchronization). The gradients of the other ranks' shares are computed and not
    used: sharding them too is ZeRO-2. Because the shares are whole tensors, optimizers that need a
    whole matrix (Muon orthogonalizes each update) work as they are.

    `param_groups` are this optimizer's own: set a group's lr (or any option) there, as on any
    optimizer. step() copies every option into the local optimizer's groups before it steps, so
    a schedule written into param_groups, or a torch lr_scheduler, takes effect. Parameter groups
    with their own settings work (weight decay on matrices only). `state` is the local optimizer's;
    `owners[i]` is the rank that owns the i-th parameter, counting through the groups in order.
    `state_dict()` holds this rank's shard: save one file per rank, and load it on the same rank
    of a run with the same world size and parameters. A closure is evaluated once, before the step;
    optimizers that call it repeatedly (LBFGS) are not supported.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], optimizer_cls: type[torch.optim.Optimizer],
                 **kwargs: Any) -> None:
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            hint = "pass the class, not an instance" if isinstance(optimizer_cls, torch.optim.Optimizer) else \
                "e.g. ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=3e-4)"
            raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer class, got {optimizer_cls!r}; {hint}")
        if issubclass(optimizer_cls, ShardedOptimizer):
            raise TypeError("optimizer_cls is itself a ShardedOptimizer; shard a plain optimizer such as "
                            "torch.optim.AdamW")
        self.rank, self.world_size = _world()
        self.optimizer_cls = optimizer_cls
        self.local_optimizer: torch.optim.Optimizer | None = None  # add_param_group, called by the base class, checks it
        super().__init__(params, kwargs)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self.owners = _partition([p.numel() for p in self._params], self.world_size)
        self._owner_of = dict(zip(map(id, self._params), self.owners))
        self.local_optimizer = optimizer_cls([self._local_group(g) for g in self.param_groups], **kwargs)
        # Show the local optimizer's defaults (momentum, betas, ...) in our groups, as a plain optimizer would.
        for outer, inner in zip(self.param_groups, self.local_optimizer.param_groups):
            for k, v in _options(inner).items():
                outer.setdefault(k, v)
        self.defaults = {**self.local_optimizer.defaults, **kwargs}
        self.state = self.local_optimizer.state

    def _local_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**_options(group), "params": [p for p in group["params"] if self._owner_of[id(p)] == self.rank]}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self.local_optimizer is None:
            return  # still in __init__, which partitions all groups at once
        # A group added later: its tensors go, largest first, to the ranks with the fewest elements.
        group = self.param_groups[-1]
        loads = [0] * self.world_size
        for p, r in zip(self._params, self.owners):
            loads[r] += p.numel()
        new = _partition([p.numel() for p in group["params"]], self.world_size, loads)
        self._params += group["params"]
        self.owners += new
        self._owner_of.update(zip(map(id, group["params"]), new))
        self.local_optimizer.add_param_group(self._local_group(group))
        for k, v in _options(self.local_optimizer.param_groups[-1]).items():
            group.setdefault(k, v)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The training loop sets lr (or anything else) on our groups; the local optimizer is the one that steps.
        for outer, inner in zip(self.param_groups, self.local_optimizer.param_groups):
            inner.update(_options(outer))
        self.local_optimizer.step()
        # Each parameter from its owner, all broadcasts in flight at once. (Flattening each rank's share
        # into one tensor would send fewer, larger messages, as ZeRO's implementations do.)
        works = [dist.broadcast(p, src=self._owner_of[id(p)], async_op=True) for p in self._params if p.requires_grad]
        for work in works:
            work.wait()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: the local optimizer's state dict, and whose it is."""
        return {"rank": self.rank, "world_size": self.world_size, "owners": list(self.owners),
                "local": self.local_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"rank", "world_size", "owners", "local"}:
            raise DistributedError("not a ShardedOptimizer state dict (expected the keys rank, world_size, owners "
                                   "and local); was it saved from a plain optimizer?")
        saved = (state_dict["rank"], state_dict["world_size"])
        if saved != (self.rank, self.world_size):
            raise DistributedError(f"this optimizer shard was saved by rank {saved[0]} of {saved[1]}, but this is "
                                   f"rank {self.rank} of {self.world_size}; each rank loads the file it saved, "
                                   "in a run of the same size")
        if list(state_dict["owners"]) != self.owners:
            raise DistributedError("the saved shard partitions other parameters than this optimizer's; build the optimizer "
                                   "over the same parameters, in the same groups and order, as when it was saved")
        self.local_optimizer.load_state_dict(state_dict["local"])
        # The saved options (lr, betas, ...) become ours again, as torch's load_state_dict does.
        for outer, inner in zip(self.param_groups, self.local_optimizer.param_groups):
            outer.update(_options(inner))
        self.state = self.local_optimizer.state


# --------------------------------------------------------------------------------------------
# FSDP (ZeRO-3) from scratch


class _ShardedWeight:
    """One weight, sharded: this rank's slice (an fp32 Parameter), the full shape, and the gradient
    its uses have produced so far in the current backward."""

    def __init__(self, weight: Tensor, rank: int, world_size: int, compute_dtype: torch.dtype | None,
                 reduce_dtype: torch.dtype) -> None:
        self.shape, self.numel = weight.shape, weight.numel()
        self.world_size = world_size
        self.shard_numel = -(-self.numel // world_size)  # ceil: the last rank's slice ends in zero padding
        flat = F.pad(weight.detach().reshape(-1).float(), (0, self.shard_numel * world_size - self.numel))
        self.param = nn.Parameter(flat[rank * self.shard_numel:(rank + 1) * self.shard_numel].clone(),
                                  requires_grad=weight.requires_grad)
        self.compute_dtype = compute_dtype  # None: the shard's float32
        self.reduce_dtype = reduce_dtype
        self.uses = 0  # forwards (with grad) whose backward has not run yet
        self.grad: Tensor | None = None  # the full weight's gradient, summed over this backward's uses so far

    def gather(self) -> Tensor:
        """The full weight, all-gathered from every rank's slice (in the compute dtype: half the traffic in bf16)."""
        shard = self.param.detach().to(self.compute_dtype or self.param.dtype)
        flat = shard.new_empty(self.shard_numel * self.world_size)
        _all_gather(flat, shard)
        return flat[: self.numel].view(self.shape)

    def add_grad(self, grad: Tensor) -> Tensor | None:
        """Add one use's gradient of the full weight; after the last pending use, return this rank's
        slice of the mean over ranks (else None: autograd adds nothing to the shard yet)."""
        grad = grad.to(self.reduce_dtype)
        self.grad = grad if self.grad is None else self.grad + grad
        self.uses -= 1
        return self.reduce_scatter() if self.uses <= 0 else None

    def reduce_scatter(self) -> Tensor:
        """Sum the full gradient over ranks, keep this rank's slice, and divide it by the world size."""
        flat = F.pad(self.grad.reshape(-1), (0, self.shard_numel * self.world_size - self.numel))
        self.grad = None
        out = flat.new_empty(self.shard_numel)
        _reduce_scatter(out, flat)
        return out.div_(self.world_size).to(self.param.dtype)


class _GatheredLinear(torch.autograd.Function):
    """F.linear with a sharded weight: gathered for forward and again for backward, never kept."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shard: Tensor, bias: Tensor | None, weight: _ShardedWeight) -> Tensor:
        ctx.save_for_backward(x)  # what nn.Linear keeps too; the full weight is not kept
        ctx.weight = weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.gather(), bias)  # the gathered weight is freed when this returns

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        weight: _ShardedWeight = ctx.weight
        dtype = grad_out.dtype  # the dtype forward computed in (autocast may have chosen it)
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out): every leading dimension is a batch dimension
        grad_x = grad_shard = grad_bias = None
        # The formulas autograd uses for nn.Linear, in the same order of operations: the same bits.
        if ctx.needs_input_grad[0]:
            grad_x = g.mm(weight.gather().to(dtype)).view(x.shape).to(x.dtype)  # gathered again, freed again
        if ctx.needs_input_grad[1]:
            grad_shard = weight.add_grad(g.t().mm(x.reshape(-1, x.shape[-1]).to(dtype)))  # (out, in), reduce-scattered
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_shard, grad_bias, None


class _GatheredEmbedding(torch.autograd.Function):
    """F.embedding with a sharded weight: gathered for forward; backward needs no weights at all."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, shard: Tensor, weight: _ShardedWeight, padding_idx: int | None,
                scale_grad_by_freq: bool) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx, ctx.scale_grad_by_freq = weight, padding_idx, scale_grad_by_freq
        return F.embedding(ids, weight.gather(), padding_idx, scale_grad_by_freq=scale_grad_by_freq)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        weight: _ShardedWeight = ctx.weight
        # The gradient adds each output row into the row of its token (index_add), zero for padding_idx.
        # embedding_dense_backward is the kernel autograd itself runs for F.embedding: the same bits.
        grad = torch.ops.aten.embedding_dense_backward(grad_out, ids, weight.shape[0],
                                                       -1 if ctx.padding_idx is None else ctx.padding_idx,
                                                       ctx.scale_grad_by_freq)
        return None, weight.add_grad(grad), None, None, None


class ShardedLinear(nn.Module):
    """An nn.Linear whose weight lives in shards (made by FullyShardedDataParallel).

    `weight` is this rank's slice of the flattened matrix (1-D, float32); `bias` is replicated.
    """

    def __init__(self, linear: nn.Linear, weight: _ShardedWeight) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = weight.param
        self.bias = linear.bias
        self.sharded = weight

    def forward(self, x: Tensor) -> Tensor:
        dtype, bias = self.sharded.compute_dtype, self.bias
        if dtype is not None:
            x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self.sharded.uses += 1
        return _GatheredLinear.apply(x, self.weight, bias, self.sharded)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"shard={self.sharded.shard_numel} of {self.sharded.numel} elements")


class ShardedEmbedding(nn.Module):
    """An nn.Embedding whose weight lives in shards (made by FullyShardedDataParallel)."""

    def __init__(self, embedding: nn.Embedding, weight: _ShardedWeight) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.scale_grad_by_freq = embedding.padding_idx, embedding.scale_grad_by_freq
        self.weight = weight.param
        self.sharded = weight

    def forward(self, ids: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self.sharded.uses += 1
        return _GatheredEmbedding.apply(ids, self.weight, self.sharded, self.padding_idx, self.scale_grad_by_freq)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"shard={self.sharded.shard_numel} of {self.sharded.numel} elements")


_LOW_PRECISION = (torch.bfloat16, torch.float16)


class FullyShardedDataParallel(nn.Module):
    """ZeRO stage 3 from scratch: each rank keeps 1/N of every matrix and gathers a layer's weight
    only while that layer computes.

        model = FullyShardedDataParallel(model, compute_dtype=torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)  # sees the shards: its state is sharded too
        loss = loss_fn(model(x), y)                                   # each rank its own slice of the batch
        loss.backward()
        model.finish_gradient_synchronization()
        optimizer.step()

    What is sharded: the weight of every nn.Linear and nn.Embedding (these classes exactly: a
    subclass may read its weight outside forward, as nn.MultiheadAttention does with its out_proj).
    Each weight is flattened, padded with zeros to a multiple of the world size and cut into equal
    slices; rank r keeps slice r as a float32 nn.Parameter. The layer is replaced in the model by a
    ShardedLinear or ShardedEmbedding whose `weight` is that slice (same name, now 1-D). Everything
    else (norm weights, biases, any other parameter) is small and replicated: every rank holds it
    whole, and finish_gradient_synchronization averages its gradient over ranks. Rank 0's weights
    and buffers are broadcast first, so every rank starts from the same model.

    When: a sharded layer's forward all-gathers its full weight, computes, and lets it go (it keeps
    only its input, as nn.Linear does). Its backward all-gathers the weight again (an embedding's
    needs none), computes the input's gradient and the full weight's, and reduce-scatters the
    latter: each rank receives the sum over ranks of its own slice, divided by the world size (the
    mean, as in DDP). A weight that several layers share (a tied embedding and output layer) is one
    shard; the full gradients of its uses are added up locally and reduce-scattered once, after
    the backward of its last pending use, so the shard gets the sum of all contributions.

    Mixed precision: with compute_dtype (torch.bfloat16 or torch.float16), each shard is cast
    before it is gathered (half the traffic), the layer's input and bias are cast, and the layer
    computes in that dtype. Weight gradients are added up and reduce-scattered in reduce_dtype,
    float32 by default (a sum of bf16 over many ranks loses digits); the shards and their gradients
    stay float32: the master weights. Under torch.autocast instead, the sharded layers compute as
    nn.Linear would (to the bit), but gather float32 weights: compute_dtype halves that traffic.

    Any optimizer built on this wrapper's parameters updates the local shards and the replicated
    parameters, so its state is sharded as well (an optimizer that needs whole matrices, as Muon
    does, cannot work on flat slices). Since the shards are 1-D, choose parameter groups (weight
    decay on matrices only) by name, which wrapping keeps, not by p.dim(); `full_shapes` holds the
    original shapes by name. Clip with `clip_grad_norm_` (torch's function would measure
    the local shards only); `full_parameters()` gathers the whole model for saving or comparing.

    Left out, for clarity (torch's FSDP2 has them): prefetching the next layer's weights while the
    current one computes (here each gather waits), sharding of other parameter types, CPU offload,
    meta-device initialization (the module is built whole on each rank first), sparse gradients and
    Embedding's max_norm. After wrapping, the module's matrices are shards: count parameters or
    FLOPs before wrapping, and generate text with a plain model loaded from full_parameters().
    """

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None, *,
                 reduce_dtype: torch.dtype = torch.float32) -> None:
        _check_module(module, "FullyShardedDataParallel")
        if compute_dtype is not None and compute_dtype not in (torch.float32, *_LOW_PRECISION):
            raise DistributedError(f"compute_dtype must be torch.bfloat16, torch.float16, torch.float32 or None "
                                   f"(the shards' float32), got {compute_dtype!r}")
        if reduce_dtype not in (torch.float32, *_LOW_PRECISION):
            raise DistributedError(f"reduce_dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                                   f"got {reduce_dtype!r}")
        rank, self.world_size = _world()
        super().__init__()
        for name, sub in module.named_modules():
            if type(sub) is nn.Embedding and (sub.max_norm is not None or sub.sparse):
                raise DistributedError(f"{name or 'the module'} is an nn.Embedding with max_norm or sparse=True, which "
                                       "FullyShardedDataParallel cannot shard; build it without them")
        _broadcast_from_rank0(module)
        self.compute_dtype, self.reduce_dtype = compute_dtype, reduce_dtype
        self._names = [name for name, _ in module.named_parameters()]  # the original names; a tied tensor under its first
        self.full_shapes = {name: p.shape for name, p in module.named_parameters()}
        first_name = {id(p): name for name, p in module.named_parameters()}
        self._weights: dict[str, _ShardedWeight] = {}  # by the name of the original weight
        by_tensor: dict[int, _ShardedWeight] = {}

        def shard(layer: nn.Module) -> nn.Module:
            w = layer.weight
            if id(w) not in by_tensor:
                by_tensor[id(w)] = self._weights[first_name[id(w)]] = _ShardedWeight(
                    w, rank, self.world_size, compute_dtype, reduce_dtype)
            return (ShardedLinear if isinstance(layer, nn.Linear) else ShardedEmbedding)(layer, by_tensor[id(w)])

        if type(module) in (nn.Linear, nn.Embedding):
            module = shard(module)
        else:
            for parent in list(module.modules()):
                for child_name, child in list(parent.named_children()):
                    if type(child) in (nn.Linear, nn.Embedding):
                        setattr(parent, child_name, shard(child))
        self.module = module
        shards = {id(w.param) for w in self._weights.values()}
        self._replicated = {name: p for name, p in module.named_parameters() if id(p) not in shards}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        """Average the replicated parameters' gradients over ranks (one all-reduce per dtype), and
        reduce-scatter any sharded gradient still waiting for a use without backward (a forward whose
        output the loss did not use). Call once after the last backward of a step, before clipping
        and the optimizer step; with gradient accumulation, the micro-batches may run before it."""
        for w in self._weights.values():
            if w.grad is not None:  # left by a use whose companion had no backward
                g = w.reduce_scatter()
                w.param.grad = g if w.param.grad is None else w.param.grad.add_(g)
            w.uses = 0
        trainable = {name: p for name, p in self._replicated.items() if p.requires_grad}
        missing = [name for name, p in trainable.items() if p.grad is None]
        if len(missing) == len(trainable):
            return  # no backward since the last call: nothing to average
        if missing:
            raise DistributedError(f"no gradient reached {missing} in this step, so they cannot be averaged; every "
                                   "trainable parameter must get a gradient: freeze unused ones with "
                                   "requires_grad_(False) before wrapping")
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in trainable.values():
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for params in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p.grad))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale all gradients so that the whole model's gradient norm is at most `max_norm`; return
        the norm before clipping. A collective: call it on every rank, after finish_gradient_synchronization.

        The squares of the shards' gradients are summed over ranks (each element lives on one rank);
        the replicated gradients are equal on every rank and count once.
        """
        if not (_is_real(max_norm) and max_norm > 0):
            raise DistributedError(f"max_norm must be a positive number, got {max_norm!r}")
        grads = [w.param.grad for w in self._weights.values() if w.param.grad is not None]
        total = torch.zeros((), dtype=torch.float32, device=next(self.parameters()).device)
        for g in grads:
            total += g.float().pow(2).sum()
        dist.all_reduce(total)
        replicated = [p.grad for p in self._replicated.values() if p.grad is not None]
        for g in replicated:
            total += g.float().pow(2).sum()
        norm = total.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # the formula of torch.nn.utils.clip_grad_norm_
        for g in itertools.chain(grads, replicated):
            g.mul_(scale.to(g.dtype))
        return norm

    @torch.no_grad()
    def full_parameters(self) -> dict[str, Tensor]:
        """Every parameter of the wrapped module, whole, under its original name and shape (a tied
        tensor once, under its first name; sharded weights in float32). A collective: call it on
        every rank; every rank gets the whole dict."""
        out = {}
        for name in self._names:
            if name in self._weights:
                w = self._weights[name]
                flat = w.param.new_empty(w.shard_numel * self.world_size)
                _all_gather(flat, w.param.detach())
                out[name] = flat[: w.numel].view(w.shape)
            else:
                out[name] = self._replicated[name].detach().clone()
        return out

    def extra_repr(self) -> str:
        local = sum(w.shard_numel for w in self._weights.values())
        return (f"world_size={self.world_size}, sharded={len(self._weights)} weights ({local} elements on this rank), "
                f"replicated={len(self._replicated)}, compute_dtype={self.compute_dtype}")


# --------------------------------------------------------------------------------------------
# torch's engines as training strategies (`minillm train --strategy NAME` under torchrun)


TORCH_STRATEGIES = ("ddp", "zero1", "zero2", "fsdp")


class _Distributed(_Strategy):
    """What every torch-engine strategy shares: the process group, collectives for the loop, rank 0 writes."""

    def __init__(self, env: DistributedEnv) -> None:
        self.env = env
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device
        self.module: nn.Module | None = None  # the wrapped model (DDP or the FSDP2 root)

    def setup(self, cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def _on_device(self, t: Tensor) -> Tensor:
        # NCCL reduces GPU tensors only; gloo takes CPU tensors.
        return t.to(self.device) if self.env.backend == "nccl" else t.cpu()

    def reduce_sum(self, t: Tensor) -> Tensor:
        out = self._on_device(t.detach().clone())
        dist.all_reduce(out)
        return out.to(t.device)

    def reduce_mean(self, t: Tensor) -> Tensor:
        # gloo has no AVG: sum, then divide (exact for a power-of-2 world size).
        return self.reduce_sum(t) / self.world_size

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.env.backend == "nccl":
            dist.barrier(device_ids=[self.env.local_rank])
        else:
            dist.barrier()


class TorchDDP(_Distributed):
    """torch.nn.parallel.DistributedDataParallel: the whole model and optimizer on every rank.

    Gradients are all-reduced in 25 MB buckets during backward (gradient_as_bucket_view: the
    gradients are views into the buckets, no extra copy); accumulation skips the all-reduce on all
    but the last micro-batch (no_sync). Every rank ends each step with the same weights and the same
    optimizer state, so rank 0's optimizer.pt is the whole state: the checkpoint of a single-device run.
    """

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.env.local_rank] if self.device.type == "cuda" else None
        self.module = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        return self.module

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.module.no_sync()


class TorchZero1(TorchDDP):
    """ZeRO-1: torch's DDP for the gradients, and this package's ShardedOptimizer (AdamW over the
    parameter groups that minillm.train.build_optimizer makes), so each rank keeps the Adam moments
    of its share of the tensors only. Its checkpoint holds one optimizer.rank{R}.pt per rank, which
    only a run of the same world size can read."""

    name = "zero1"
    optimizer_format = "zero1"

    def build_optimizer(self, model: nn.Module, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
        if cfg.optimizer != "adamw":
            raise DistributedError(f"strategy=zero1 shards AdamW; optimizer={cfg.optimizer!r} is not supported with it: "
                                   "use strategy=ddp, or optimizer=adamw")
        groups = T.adamw_param_groups(model, cfg)
        impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return ShardedOptimizer(groups, torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **impl)

    def _file(self, folder: Any) -> Any:
        return folder / f"optimizer.rank{self.rank}.pt"

    def save_optimizer(self, folder: Any, model: nn.Module, optimizer: Any) -> None:
        torch.save(optimizer.state_dict(), self._file(folder))

    def load_optimizer(self, folder: Any, model: nn.Module, optimizer: Any) -> None:
        state = T._load_torch_file(self._file(folder))
        try:
            optimizer.load_state_dict(state)
        except (DistributedError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise T.CheckpointError(f"{self._file(folder)} does not fit this rank's optimizer ({e})") from None


class TorchFSDP(_Distributed):
    """FSDP2: `fully_shard` on each transformer block, then on the root (the embedding, the final
    norm and the output layer, tied or not). Each rank keeps 1/N of every parameter as a DTensor
    (the same names and global shapes: p.dim() and parameter groups work as on the plain model);
    a block's parameters are all-gathered for its forward and backward, and its gradients
    reduce-scattered. reshard_after_forward=True frees the gathered block after forward (ZeRO-3,
    strategy=fsdp); False keeps it until backward (ZeRO-2, strategy=zero2: more memory, one
    all-gather less per step). On CUDA with bf16 the parameters are gathered and computed in bf16
    and the gradients reduced in fp32 (MixedPrecisionPolicy); the shards stay fp32.

    Accumulation: set_requires_gradient_sync(False) on all but the last micro-batch keeps the
    unsharded gradients and reduce-scatters their sum once. Clipping measures the global norm
    (clip_grad_norm_ on DTensor gradients reduces across ranks). The checkpoint's optimizer state
    is a torch.distributed.checkpoint folder (each rank writes its shards; it can be loaded on
    another number of ranks), and model.safetensors the full weights, gathered to rank 0.
    """

    optimizer_format = "dcp"

    def __init__(self, env: DistributedEnv, reshard_after_forward: bool) -> None:
        super().__init__(env)
        self.reshard_after_forward = reshard_after_forward
        self.name = "fsdp" if reshard_after_forward else "zero2"
        self._plain: nn.Module | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward}
        if self.device.type == "cuda" and getattr(self, "dtype", torch.float32) == torch.bfloat16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.module = model
        return model

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor: the same on every rank

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # Gathered shard by shard into CPU memory on rank 0 only (the other ranks get an empty dict).
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def inference_model(self, model: nn.Module) -> nn.Module | None:
        full = self.full_state_dict(model)
        if not self.is_main:
            return None
        if self._plain is None:
            from minillm.model import LLM

            self._plain = LLM(model.cfg).to(self.device)
        state = dict(full)
        if model.cfg.tie_embeddings:  # the checkpoint convention: one tensor for both names
            state["lm_head.weight"] = state["token_embedding.weight"]
        self._plain.load_state_dict(state)
        return self._plain

    def save_optimizer(self, folder: Any, model: nn.Module, optimizer: Any) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder / "optimizer"))

    def load_optimizer(self, folder: Any, model: nn.Module, optimizer: Any) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        # A template of this run's shards (the state initialized with a zero-lr step), filled in place
        # by dcp.load, which reads each saved shard's overlap with them: any world size works.
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        try:
            dcp.load(state, checkpoint_id=str(folder / "optimizer"))
        except Exception as e:  # DCP reports a missing or foreign folder with its own error types
            raise T.CheckpointError(f"{folder / 'optimizer'}: the DCP optimizer state cannot be loaded "
                                                  f"({' '.join(str(e).split())[:300]})") from None
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def make_strategy(name: str, device: str = "auto") -> _Strategy:
    """The training strategy `name` (minillm.train.STRATEGIES), in the process group that torchrun prepared.

    "single" is one process on one device. "ddp", "zero1", "zero2" and "fsdp" need torchrun's
    environment (a world of 1 is fine); the process group is set up here (init_distributed: NCCL
    with GPU LOCAL_RANK per rank when CUDA is there and `device` allows it, else gloo on the CPU).
    """
    if name not in T.STRATEGIES:
        raise T.TrainError(f"strategy must be {' or '.join(map(repr, T.STRATEGIES))}, got {name!r}")
    if name == "single":
        return T.SingleDevice()
    try:
        found = torchrun_env()
    except DistributedError as e:
        raise T.TrainError(str(e)) from None
    if found is None:
        raise T.TrainError(f"strategy={name} runs one process per device, started by torchrun: "
                           f"`torchrun --nproc_per_node=N -m minillm train --strategy {name} ...` (N GPUs, or N CPU "
                           "processes); for one process without torchrun use strategy=single")
    if device.split(":")[0] == "mps" or (device.startswith("cuda:")):
        raise T.TrainError(f"device={device!r} cannot be used under torchrun: each rank uses GPU LOCAL_RANK (device=auto "
                           "or cuda), or the CPU (device=cpu); MPS has no multi-process backend")
    backend = "gloo" if device == "cpu" or not torch.cuda.is_available() else "nccl"
    if device == "cuda" and backend != "nccl":
        raise T.TrainError("device='cuda' but CUDA is not available here; use device=auto or device=cpu")
    try:
        env = init_distributed(backend)
    except DistributedError as e:
        raise T.TrainError(str(e)) from None
    if name == "ddp":
        return TorchDDP(env)
    if name == "zero1":
        return TorchZero1(env)
    return TorchFSDP(env, reshard_after_forward=name == "fsdp")
