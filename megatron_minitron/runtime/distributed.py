"""Process groups: the only module that calls megatron-core's parallel_state."""

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
from megatron_minitron.runtime import cpu_compat
from megatron_minitron.runtime.allocator import keep_freed_memory
from megatron_minitron.runtime.device import resolve_device


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the layout, with the groups library code needs (passed explicitly)."""

    device: torch.device
    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    vpp_size: Optional[int]
    tp_group: object
    pp_group: object
    dp_group: object
    dp_cp_group: object
    mp_group: object
    ep_size: int = 1
    """Expert parallel size (MoE): experts are split over the EP group."""
    ep_rank: int = 0
    ep_group: object = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 of the last pipeline stage sees the loss; rank 0 overall writes files."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device) -> None:
    """torch.distributed from torchrun's env, or a world of one without torchrun."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _prepare_process(runtime: RuntimeConfig) -> torch.device:
    """The device, with this process set up for it: on a CPU, megatron's CUDA calls mapped
    (without CUDA) and freed memory kept for reuse."""
    device = resolve_device(runtime)
    if device.type == "cpu" and not torch.cuda.is_available():
        cpu_compat.install()
    if device.type == "cpu":
        keep_freed_memory()
    return device


def initialize(parallel: ParallelConfig, runtime: RuntimeConfig) -> ParallelContext:
    """Set up devices, process groups and seeds. Call once per process; undo with teardown()."""
    from megatron.core import parallel_state as ps

    device = _prepare_process(runtime)
    init_process_group(device)
    world = dist.get_world_size()
    parallel.check_world_size(world)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
        )
    set_seed(runtime.seed)
    if runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    return current_context(device)


@contextlib.contextmanager
def process_groups(parallel: ParallelConfig, runtime: RuntimeConfig
                   ) -> Iterator[ParallelContext]:
    """A stage's process groups: initialize() on entry, teardown() on exit, error or not."""
    ctx = initialize(parallel, runtime)
    try:
        yield ctx
    finally:
        teardown()


def pipeline_stage_flags(vp_stage: Optional[int]) -> Tuple[bool, bool]:
    """(pre_process, post_process) of this rank's model chunk `vp_stage` (None without
    virtual pipeline stages): whether it holds the embedding, and the output layer."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))


def set_seed(seed: int) -> None:
    """Same default seed on every rank (megatron's data-parallel seed) + the TP RNG tracker."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def current_context(device: Optional[torch.device] = None) -> ParallelContext:
    from megatron.core import parallel_state as ps

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if (
            torch.cuda.is_available() and not cpu_compat.is_installed()) else torch.device("cpu")
    return ParallelContext(
        device=device,
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        vpp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        mp_group=ps.get_model_parallel_group(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
    )


def set_virtual_pipeline_rank(rank: Optional[int]) -> None:
    from megatron.core import parallel_state as ps

    ps.set_virtual_pipeline_model_parallel_rank(rank)


_held = False
"""True while a multi-stage job (the pipeline) keeps torch.distributed alive between stages."""


@contextlib.contextmanager
def process_group_held(runtime: RuntimeConfig):
    """Initialise torch.distributed once for several stages: each stage's teardown() then only
    destroys megatron's model-parallel groups (re-initialising a torchrun world is not
    reliable). Yields (rank, world_size)."""
    global _held
    device = _prepare_process(runtime)
    init_process_group(device)
    _held = True
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        _held = False
        teardown()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy_subgroups() -> None:
    """Destroy every process group but the default one: the groups megatron-core's
    initialize_model_parallel made for a stage. destroy_model_parallel only drops megatron's
    references; while the default group is held across stages (process_group_held) torch
    keeps the groups registered, and each gloo group keeps its threads (its TCP loop thread
    wakes periodically). A run of many stages in one process (a pipeline, a search, the study)
    piled them up: 888 TCP loop threads after 37 minutes of bench/study.py, which had used
    1,196 s of CPU.
    Destroyed newest first on every rank, as torch destroys them itself."""
    from torch.distributed import distributed_c10d as c10d

    world = dist.group.WORLD
    for pg in reversed(list(c10d._world.pg_names)):  # registration order, newest first
        if pg is not world:
            dist.destroy_process_group(pg)


def teardown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        if _held:
            destroy_subgroups()
        else:
            dist.destroy_process_group()
    if not _held:  # code after the stage (a user's own HF model, a baseline) runs unpatched
        cpu_compat.uninstall()
