"""Run a function on N CPU processes with gloo, the way torchrun would, and collect results."""

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, _by_value(fn(*args)), None))
    except BaseException:  # report the traceback to the parent, then fail this process
        queue.put((rank, None, traceback.format_exc()))
    finally:
        from megatron_minitron.runtime.distributed import teardown

        try:
            teardown()
        except Exception:
            pass


def _by_value(result) -> bytes:
    """The result serialised with its tensors' contents: torch's multiprocessing queue would
    share tensors through file descriptors that this worker's exit can remove before the
    parent has read them."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(result, buf)
    return buf.getvalue()


def run_distributed(fn, world_size: int, *args):
    """fn(*args) on world_size gloo ranks; returns [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in procs:
        rank, out, err = queue.get(timeout=600)
        if out is not None:
            import io

            import torch

            out = torch.load(io.BytesIO(out), weights_only=False)
        results[rank] = out
        if err:
            errors.append(f"rank {rank}:\n{err}")
    for p in procs:
        p.join(timeout=60)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
