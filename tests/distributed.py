"""Run a function on N CPU processes with gloo, the way torchrun would, and collect results."""

import os
import queue as queue_mod
import shutil
import socket
import traceback

import torch.multiprocessing as mp

# after one rank fails, how long the others get to report before they are killed: a rank
# whose peer died can wait on a collective or a store for its whole timeout
GRACE_AFTER_ERROR_S = 30
PORT_WAIT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def next_port() -> int:
    """In a worker, right before a run: a fresh rendezvous port for it. Rank 0 asks the OS for
    a free one and leaves it in the call's folder; the other ranks read it there. Picked this
    late, the port has seconds, not minutes, in which another test's process (pytest runs two
    workers) or a previous run's gloo pair can take it."""
    import time

    n = int(os.environ.get("MINITRON_TEST_RUNS", "0"))
    os.environ["MINITRON_TEST_RUNS"] = str(n + 1)
    path = os.path.join(os.environ["MINITRON_TEST_RDZV"], f"port{n}")
    if os.environ["RANK"] == "0":
        with open(path + ".tmp", "w") as f:
            f.write(str(_free_port()))
        os.replace(path + ".tmp", path)
    deadline = time.monotonic() + PORT_WAIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 left no port for run {n} in {PORT_WAIT_S} s")
        time.sleep(0.05)
    with open(path) as f:
        os.environ["MASTER_PORT"] = f.read()
    return int(os.environ["MASTER_PORT"])


def _worker(rank, world_size, rdzv, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), MINITRON_TEST_RDZV=rdzv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    # megatron's imports take seconds: made before the first port is picked
    __import__("megatron.core")

    torch.set_num_threads(1)
    try:
        next_port()
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


def _kill_tree(p) -> None:
    """Kill a worker and what it started: a megatron async-save Manager server outlives a
    killed worker and would hold the test run's output open."""
    import psutil

    try:
        children = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    p.kill()
    p.join()
    for c in children:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass


def run_distributed(fn, world_size: int, *args, timeout_s: float = 600):
    """fn(*args) on world_size gloo ranks; returns [result of rank 0, rank 1, ...].

    A rank's error is raised with its traceback even when another rank hangs waiting for it;
    every worker is gone when this returns or raises (a leftover one would hold the test
    run's output open)."""
    import tempfile
    import time

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rdzv = tempfile.mkdtemp(prefix="minitron_rdzv_")
    procs = [ctx.Process(target=_worker, args=(r, world_size, rdzv, fn, args, queue))
             for r in range(world_size)]
    results, errors = {}, []
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(results) < world_size:
            wait = deadline - time.monotonic()
            if errors:
                wait = min(wait, GRACE_AFTER_ERROR_S)
            try:
                rank, out, err = queue.get(timeout=max(wait, 0.1))
            except queue_mod.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                errors.append(f"ranks {missing} did not report within "
                              f"{GRACE_AFTER_ERROR_S if errors else timeout_s:.0f} s")
                break
            if out is not None:
                import io

                import torch

                out = torch.load(io.BytesIO(out), weights_only=False)
            results[rank] = out
            if err:
                errors.append(f"rank {rank}:\n{err}")
    finally:
        for p in procs:
            p.join(timeout=60 if not errors else 5)
            if p.is_alive():
                _kill_tree(p)
        shutil.rmtree(rdzv, ignore_errors=True)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
