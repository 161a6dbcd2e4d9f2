"""runtime/distributed.py: stages run one after another under process_group_held (the
pipeline, search, the study) leave no process groups, and so no gloo threads, behind."""

from distributed import run_distributed


def _stages(n):
    import psutil
    from torch.distributed import distributed_c10d as c10d

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.runtime.distributed import initialize, process_group_held, teardown

    cfg = load_config(["model=tiny"])
    seen = []
    with process_group_held(cfg.runtime):
        for _ in range(n):
            initialize(cfg.parallel, cfg.runtime)
            during = len(c10d._world.pg_names)
            teardown()
            seen.append((during, len(c10d._world.pg_names), psutil.Process().num_threads()))
    return seen


def test_stages_leave_no_process_groups_or_threads():
    seen = run_distributed(_stages, 1, 4)[0]
    assert all(during > 1 for during, _, _ in seen)  # megatron made its groups in each stage
    assert [after for _, after, _ in seen] == [1] * 4  # only the held default group is left
    threads = [t for _, _, t in seen]
    assert threads[-1] <= threads[0] + 2, threads  # they did not pile up (a few per stage before)
