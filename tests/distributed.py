"""Run a function on N CPU processes with gloo, the way torchrun would, and collect results."""

import os
import queue as queue_mod
import socket
import traceback

import torch.multiprocessing as mp

PORTS_PER_RUN = 32
# after one rank fails, how long the others get to report before they are killed: a rank
# whose peer died can wait on a collective or a store for its whole timeout
GRACE_AFTER_ERROR_S = 30


def _free_ports(n: int) -> list[int]:
    """n distinct ports the OS had free, all held at once so none repeats."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def next_port() -> int:
    """In a worker: move MASTER_PORT to the next port the parent picked, for the next run of
    several in one set of processes. Each run gets a port the OS handed out as free, never
    port + i: that can be a socket the previous run's gloo pairs still hold."""
    ports = os.environ["MINITRON_TEST_PORTS"].split(",")
    if not ports[0]:
        raise RuntimeError(f"more than {PORTS_PER_RUN} runs in one run_distributed call")
    os.environ["MASTER_PORT"], rest = ports[0], ports[1:]
    os.environ["MINITRON_TEST_PORTS"] = ",".join(rest)
    return int(os.environ["MASTER_PORT"])


def _worker(rank, world_size, ports, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MINITRON_TEST_PORTS=",".join(map(str, ports[1:])))
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
    import time

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports = _free_ports(PORTS_PER_RUN + 1)
    procs = [ctx.Process(target=_worker, args=(r, world_size, ports, fn, args, queue))
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
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
