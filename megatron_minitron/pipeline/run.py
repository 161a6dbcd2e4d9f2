"""`minitron pipeline`: teacher -> correction -> importance -> target -> prune -> distill ->
eval -> export -> report, each stage in run.dir/<stage>/, skipped when its `stage.json` says it
finished (so rerunning the same command after a crash resumes where it stopped).

Iterative mode (pipeline.iterations = R > 1) runs importance/prune/distill R times with
parameter budgets spaced geometrically from the teacher's to the target's, folders suffixed
_1.._R; the last round prunes to exactly the architecture one round would (round_configs), and
every round distills from the (corrected) original teacher."""

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.checkpoint.embedded import teacher_label
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.pipeline import stages
from megatron_minitron.runtime.distributed import barrier, process_group_held
from megatron_minitron.runtime.run_lock import hold_run_dir
from megatron_minitron.runtime import atomic_files

MARKER = "stage.json"


class StageRunner:
    """Runs stages in order, skipping finished ones. A forced stage reruns from scratch (its
    folder is removed first) and so does every stage after it."""

    def __init__(self, run_dir: Path, force: List[str], rank: int):
        self.run_dir, self.force, self.rank = run_dir, set(force), rank
        self.forcing = "all" in self.force

    def run(self, name: str, fn: Callable[[Path], Dict]) -> Dict:
        out = self.run_dir / name
        self.forcing = self.forcing or name.split("_")[0] in self.force
        if self.forcing and self.rank == 0 and out.exists():
            shutil.rmtree(out)
        barrier()
        marker = out / MARKER
        if marker.is_file():
            return json.loads(marker.read_text())["outputs"]
        if self.rank == 0:
            print(f"minitron pipeline: stage {name}", flush=True)
        start = time.time()
        outputs = fn(out)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            record = {"stage": name, "seconds": round(time.time() - start, 1), "outputs": outputs}
            atomic_files.write_json(marker, record, indent=2)
        barrier()
        return outputs


def round_budgets(cfg: MinitronConfig, teacher: ModelConfig) -> List[Optional[int]]:
    """Non-embedding parameter budget of each round (None: prune.target / param_budget)."""
    p, prune = cfg.pipeline, cfg.prune
    explicit = prune.param_budget is not None or any(
        v is not None for v in dataclasses.asdict(prune.target).values())
    if explicit:
        if p.iterations > 1:
            raise ConfigError("pipeline.iterations", "iterative pruning needs a parameter "
                              "fraction to space its rounds", "use pipeline.param_fraction "
                              "without prune.target / prune.param_budget, or iterations=1")
        return [None]
    if p.param_fraction is None:
        raise ConfigError("pipeline.param_fraction", "no target: prune.target, "
                          "prune.param_budget and pipeline.param_fraction are all unset",
                          "set pipeline.param_fraction=0.5 or a prune target")
    n = teacher.num_parameters(include_embeddings=False)
    return [int(n * p.param_fraction ** ((r + 1) / p.iterations)) for r in range(p.iterations)]


def prune_config(cfg: MinitronConfig, budget: Optional[int]) -> MinitronConfig:
    """This round's prune section: its budget, and sizes that fit the run's own TP/PP."""
    prune, par = cfg.prune, cfg.parallel
    prune = dataclasses.replace(
        prune, tensor_model_parallel_size=max(prune.tensor_model_parallel_size,
                                              par.tensor_model_parallel_size),
        pipeline_model_parallel_size=max(prune.pipeline_model_parallel_size,
                                         par.pipeline_model_parallel_size))
    if budget is not None:
        prune = dataclasses.replace(prune, param_budget=budget, budget_include_embeddings=False)
    return dataclasses.replace(cfg, prune=prune)


def round_configs(cfg: MinitronConfig, teacher: ModelConfig) -> List[MinitronConfig]:
    """The config of every round: prune_config of its budget. With R > 1 rounds and a fixed
    target the last round prunes to the sizes one round from the teacher would choose (resolved
    on the teacher), not to the budget on the previous round's model: its sizes are already
    snapped, so the budget alone would end at another architecture (SmolLM2-135M at 0.5: ffn
    1048 in two rounds against 1031 in one)."""
    rounds = [prune_config(cfg, b) for b in round_budgets(cfg, teacher)]
    last = rounds[-1].prune
    if len(rounds) == 1 or cfg.pipeline.target != "fixed":
        return rounds
    from megatron_minitron.pruning.plan import resolve_target

    one_shot = resolve_target(teacher, last)
    target = dataclasses.replace(last.target, **{a: getattr(one_shot, a)
                                                 for a in last.budget_axes})
    rounds[-1] = dataclasses.replace(rounds[-1], prune=dataclasses.replace(
        last, param_budget=None, target=target))
    return rounds


def final_model(teacher: ModelConfig, rounds: List[MinitronConfig]) -> Optional[ModelConfig]:
    """The architecture the rounds end at, resolved round by round before any importance or
    training work (ConfigError for an impossible target); None when pipeline.target=search
    chooses it later."""
    from megatron_minitron.pruning.plan import resolve_target

    if rounds[-1].pipeline.target != "fixed":
        return None
    model = teacher
    for r, rcfg in enumerate(rounds):
        try:
            model = resolve_target(model, rcfg.prune)
        except ConfigError as e:
            if r == 0:
                raise
            raise ConfigError("pipeline.iterations", f"round {r + 1} of {len(rounds)} cannot "
                              f"reach the one-shot target from round {r}'s model ({e})",
                              "use fewer iterations or pipeline.iterations=1") from e
    return model


def importance_config(cfg: MinitronConfig) -> MinitronConfig:
    """Skip-one-layer loss scores cost a forward pass per layer: computed only when the target
    may change depth."""
    prune = cfg.prune
    depth = (prune.target.num_layers is not None or "num_layers" in prune.budget_axes
             or cfg.pipeline.target == "search" or prune.depth_mode == "block")
    if depth:
        return cfg
    return dataclasses.replace(cfg, importance=dataclasses.replace(cfg.importance,
                                                                   depth_loss=False))


def run_pipeline(cfg: MinitronConfig) -> Dict:
    """Every stage, in order; returns the summary (also run.dir/summary.json)."""
    p = cfg.pipeline
    run_dir = Path(cfg.run.dir)
    with process_group_held(cfg.runtime) as (rank, _), hold_run_dir(cfg.run.dir, rank):
        runner = StageRunner(run_dir, p.force, rank)
        teacher = runner.run("teacher", lambda out: stages.import_teacher(cfg, out))
        tokens = 0
        if p.correction_iters:
            teacher = runner.run("correction", lambda out: stages.correct_teacher(
                cfg, teacher["checkpoint"], out))
            tokens = teacher["tokens"]
        teacher_ckpt = teacher["checkpoint"]
        if p.teacher_cache:  # one pass of the teacher, read by search and every round
            cached = runner.run("teacher_cache", lambda out: stages.cache_teacher(
                cfg, teacher_ckpt, out))
            cfg = dataclasses.replace(cfg, distill=dataclasses.replace(
                cfg.distill, teacher_cache=cached["cache"]))
        teacher_model = ckpt.read_header(teacher_ckpt).model
        configs = round_configs(importance_config(cfg), teacher_model)
        final_model(teacher_model, configs)
        student, rounds = teacher_ckpt, []
        for r, rcfg in enumerate(configs):
            sfx = "" if len(configs) == 1 else f"_{r + 1}"
            scores = runner.run(f"importance{sfx}", lambda out: stages.score(
                rcfg, student, str(out / "scores.safetensors")))
            if p.target == "search":
                rcfg = searched_target(rcfg, runner, teacher_ckpt, student, scores["scores"])
            pruned = runner.run(f"prune{sfx}", lambda out: stages.prune(
                rcfg, student, scores["scores"], str(out / "checkpoint")))
            distilled = runner.run(f"distill{sfx}", lambda out: stages.distill_student(
                rcfg, teacher_ckpt, pruned["checkpoint"], out))
            tokens += scores["tokens"] + distilled["tokens"]
            rounds.append({"scores": scores, "pruned": pruned, "distilled": distilled,
                           "tokens": tokens})
            student = distilled["checkpoint"]
        models = {"teacher": (teacher_ckpt, teacher.get("tokens", 0)),
                  "pruned": (rounds[-1]["pruned"]["checkpoint"],
                             rounds[-1]["tokens"] - rounds[-1]["distilled"]["tokens"]),
                  "distilled": (student, tokens)}
        evals = runner.run("eval", lambda out: stages.evaluate_models(
            cfg, {k: v[0] for k, v in models.items()}, out))
        exported = runner.run("export", lambda out: stages.export(cfg, student, out)) \
            if p.export else {}
        summary = {"rows": [dict(name=name, path=path, tokens=tok, **evals[name])
                            for name, (path, tok) in models.items()],
                   "export": exported.get("hf_dir"), "run_dir": str(run_dir),
                   "teacher": teacher_label(p.teacher)}
        if rank == 0:
            atomic_files.write_json(run_dir / "summary.json", summary, indent=2)
        runner.force.add("report")  # cheap, and always reflects the latest outputs
        runner.run("report", lambda out: stages.report(cfg, summary, out))
    return summary


def searched_target(cfg: MinitronConfig, runner: StageRunner, teacher: str, student: str,
                    scores: str) -> MinitronConfig:
    """The best candidate of `minitron search` as this round's prune target."""
    from megatron_minitron.pipeline.search_runs import row_prune_config

    best = runner.run("search", lambda out: stages.search(cfg, teacher, student, scores, out))
    return dataclasses.replace(cfg, prune=row_prune_config(best, cfg.prune))

