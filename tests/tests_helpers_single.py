"""A world-of-one process group for tests that build megatron models in the pytest process."""

import contextlib


@contextlib.contextmanager
def single_process(cfg):
    from megatron_minitron.runtime.distributed import initialize

    ctx = initialize(cfg.parallel, cfg.runtime)
    yield cfg, ctx
