"""A world-of-one process group for tests that build megatron models in the pytest process."""

import contextlib


@contextlib.contextmanager
def single_process(cfg):
    """initialize() for the block, teardown() after it: the default group is destroyed and the
    CPU layer removed, so a later test starts from a clean process (a CLI stage run in-process
    after this used to find the group alive and leave the CPU layer installed)."""
    from megatron_minitron.runtime.distributed import initialize, teardown

    ctx = initialize(cfg.parallel, cfg.runtime)
    try:
        yield cfg, ctx
    finally:
        teardown()
