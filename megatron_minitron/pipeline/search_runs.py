"""Architecture search, the orchestration half: prune every candidate from the saved scores,
distill it briefly from the teacher, rank by validation loss.

Layout under the search folder (search.output, default RUN_DIR/search):
    candidates.json          the candidates chosen by pruning.candidates, before any training
    <name>/pruned/           the pruned checkpoint (shared by both modes)
    <name>/checkpoints/      the short distillation's checkpoints
    <name>/metrics.jsonl     its losses; the last valid_* record is the candidate's score
    <name>/result.json       the candidate's row; present means done (a rerun skips it)
    <name>/zero_shot/        search.zero_shot: the evaluation right after pruning
    <name>/zero_shot.json    search.zero_shot: the candidate's row
    ranking.json, ranking.md rows sorted by search.metric, best first
                             (ranking_zero_shot.* with search.zero_shot)
Every candidate ends with one evaluation over the same search.eval_iters validation batches
(the validation iterator always restarts at the split's first sample), so losses compare.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.parallel import ParallelConfig
from megatron_minitron.config.prune import PruneConfig, PruneTarget
from megatron_minitron.config.schema import MinitronConfig, RunConfig
from megatron_minitron.importance.scores import load_scores
from megatron_minitron.pruning.plan import make_plan, resolve_target
from megatron_minitron.pruning.candidates import Candidate, search_candidates
from megatron_minitron.runtime.rank import is_rank0
from megatron_minitron.runtime import atomic_files


@dataclass
class SearchResult:
    best: dict
    """The winning row (see ranking)."""
    ranking: List[dict]
    """Rows best first: name, params, val_loss, valid (every valid_* value), kind, target,
    depth_mode, layers (kept source layers), drop_layers, pruned, distilled, iters, tokens."""
    ranking_json: Path
    ranking_md: Path


@dataclass
class Inputs:
    source: str
    scores: str
    teacher: str
    output: Path
    budget: int
    prune: PruneConfig


def resolve_inputs(cfg: MinitronConfig) -> Inputs:
    s, p = cfg.search, cfg.prune
    source = cfg.search_checkpoint
    if source is None:
        raise ConfigError("search.checkpoint", "no checkpoint to prune",
                          "set search.checkpoint, prune.checkpoint or checkpoint.load")
    budget = s.param_budget or p.param_budget
    if budget is None:
        raise ConfigError("search.param_budget", "no parameter budget",
                          "set search.param_budget (or prune.param_budget)")
    # candidates must run at the distillation's TP as well as at the one asked for in prune
    tp = max(p.tensor_model_parallel_size, cfg.parallel.tensor_model_parallel_size)
    return Inputs(source=source,
                  scores=cfg.search_scores,
                  teacher=cfg.distill.teacher_checkpoint or source,
                  output=Path(cfg.search_output), budget=budget,
                  prune=dataclasses.replace(p, tensor_model_parallel_size=tp))


def distill_iters(cfg: MinitronConfig) -> int:
    s, tokens_per_step = cfg.search, cfg.train.global_batch_size * cfg.data.seq_length
    return math.ceil(s.distill_tokens / tokens_per_step) if s.distill_tokens else s.distill_iters


def candidate_config(cfg: MinitronConfig, inputs: Inputs, folder: Path, pruned: str
                     ) -> MinitronConfig:
    """The run of one candidate: the user's train/data/distill settings, our folder, weights
    from the pruned checkpoint, a final-only evaluation of search.eval_iters batches."""
    iters, t = distill_iters(cfg), cfg.train
    optimizer = dataclasses.replace(t.optimizer, lr_warmup_iters=min(
        t.optimizer.lr_warmup_iters, iters - 1))
    train = dataclasses.replace(t, train_iters=iters, eval_interval=0,
                                eval_iters=cfg.search.eval_iters, exit_after_iters=None,
                                optimizer=optimizer)
    return dataclasses.replace(
        cfg, run=RunConfig(dir=str(folder)), model=ckpt.read_header(pruned).model, train=train,
        checkpoint=dataclasses.replace(cfg.checkpoint, load=pruned, save=None),
        distill=dataclasses.replace(cfg.distill, teacher_checkpoint=inputs.teacher))


def prune_candidate(cfg: MinitronConfig, inputs: Inputs, cand: Candidate, output: Path) -> str:
    from megatron_minitron.pruning.slicing import prune_checkpoint
    from megatron_minitron.runtime.distributed import process_groups

    # pruning reads one full copy: TP=1, PP=1
    with process_groups(ParallelConfig(), cfg.runtime) as ctx:
        return str(prune_checkpoint(inputs.source, inputs.scores, cand.prune_config(inputs.prune),
                                    str(output), ctx, cfg.runtime))


def evaluate_only(cfg: MinitronConfig) -> Dict[str, float]:
    """Zero-shot: the distillation run's setup and final evaluation, without a training step."""
    from megatron_minitron.runtime.distributed import process_groups
    from megatron_minitron.training.data_source import build_source, resolve_tokenizer
    from megatron_minitron.training.lm import kd_step, write_resolved_config
    from megatron_minitron.training.session import adopt_model_config, build_trainer, find_start

    with process_groups(cfg.parallel, cfg.runtime) as ctx:
        start = find_start(cfg)
        cfg = adopt_model_config(cfg, start, False)
        write_resolved_config(cfg, ctx.rank)
        tok = resolve_tokenizer(cfg, start.header)
        make_step = kd_step(cfg, ctx)
        trainer, state = build_trainer(cfg, ctx, start, make_step, build_source(cfg, ctx, tok),
                                       tok.describe())
        valid = trainer.evaluate()
        trainer.writer.log(state.step, valid)
        trainer.writer.close()
        return valid


def last_valid(run_dir: Path) -> Dict[str, float]:
    from megatron_minitron.training.metrics import read_metrics

    rows = [m for m in read_metrics(str(run_dir)) if any(k.startswith("valid_") for k in m)]
    if not rows:
        raise RuntimeError(f"{run_dir} logged no validation losses")
    return {k: v for k, v in rows[-1].items() if k.startswith("valid_")}


def settings(cfg: MinitronConfig, inputs: Inputs) -> dict:
    """What a stored result depends on besides the candidate; a rerun must match it."""
    return {"iters": 0 if cfg.search.zero_shot else distill_iters(cfg),
            "eval_iters": cfg.search.eval_iters, "teacher": inputs.teacher,
            "source": inputs.source, "seq_length": cfg.data.seq_length,
            "global_batch_size": cfg.train.global_batch_size}


def reuse_pruned(path: Path, target, layers: List[int]) -> Optional[str]:
    """An earlier run's pruned checkpoint, if there is one; it must match the plan."""
    found = ckpt.resolve(str(path))
    if found is None:
        return None
    header = ckpt.read_header(str(found))
    if header.model != target or header.extra.get("pruned_from", {}).get("layers") != layers:
        raise ConfigError("search.output", f"{found} holds another pruning of this candidate "
                          f"(layers {header.extra.get('pruned_from', {}).get('layers')}, "
                          f"the plan keeps {layers})",
                          "use another search.output or delete that folder")
    return str(found)


def run_candidate(cfg: MinitronConfig, inputs: Inputs, cand: Candidate, target,
                  layers: List[int]) -> dict:
    folder, zero_shot = inputs.output / cand.name, cfg.search.zero_shot
    result = folder / ("zero_shot.json" if zero_shot else "result.json")
    want = settings(cfg, inputs)
    if result.is_file():
        row = json.loads(result.read_text())
        made = (row.get("settings"), row.get("target"), row.get("layers"))
        if made != (want, cand.sizes, layers):
            raise ConfigError("search.output", f"{result} was made with {made}, this run asks "
                              f"for {(want, cand.sizes, layers)}",
                              "use another search.output or delete that folder")
        # search.metric may have changed since: every valid_* value is stored
        return {**row, "val_loss": row["valid"][f"valid_{cfg.search.metric}"]}
    pruned = reuse_pruned(folder / "pruned", target, layers) or prune_candidate(
        cfg, inputs, cand, folder / "pruned")
    if zero_shot:
        valid = evaluate_only(candidate_config(cfg, inputs, folder / "zero_shot", pruned))
        distilled = None
    else:
        from megatron_minitron.training.lm import distill

        distill(candidate_config(cfg, inputs, folder, pruned))
        valid, distilled = last_valid(folder), str(ckpt.resolve(str(folder / "checkpoints")))
    iters = want["iters"]
    row = {"name": cand.name, "params": cand.params,
           "val_loss": valid[f"valid_{cfg.search.metric}"], "valid": valid, "kind": cand.kind,
           "target": cand.sizes, "depth_mode": cand.depth_mode, "layers": layers,
           "drop_layers": cand.drop_layers, "pruned": pruned, "distilled": distilled,
           "iters": iters, "tokens": iters * want["global_batch_size"] * want["seq_length"],
           "settings": want}
    if is_rank0():
        atomic_files.write_json(result, row, indent=2)
    return row


def rank_rows(rows: List[dict]) -> List[dict]:
    """Ascending validation loss; NaN last; ties by name so the order is reproducible."""
    return sorted(rows, key=lambda r: (math.isnan(r["val_loss"]), r["val_loss"], r["name"]))


def ranking_table(rows: List[dict], metric: str) -> str:
    head = ("| rank | name | kind | params | layers | hidden | ffn | heads | groups | "
            f"valid {metric} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(rows, 1):
        t = r["target"]
        lines.append(f"| {i} | {r['name']} | {r['kind']} | {r['params']:,} | "
                     f"{t['num_layers']} | {t['hidden_size']} | {t['ffn_hidden_size']} | "
                     f"{t['num_attention_heads']} | {t['num_query_groups']} | "
                     f"{r['val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def row_prune_config(row: dict, base: PruneConfig) -> PruneConfig:
    """`base` aimed at a ranking row's candidate: its sizes and how it chose layers."""
    return dataclasses.replace(base, target=PruneTarget(**row["target"]), param_budget=None,
                               depth_mode=row["depth_mode"], drop_layers=list(row["drop_layers"]))


def run_search(cfg: MinitronConfig, candidates: Optional[List[Candidate]] = None
               ) -> SearchResult:
    """Search cfg.search's space (or the given candidates) and write the ranking. Collective:
    every rank of the launch calls it."""
    inputs = resolve_inputs(cfg)
    src = ckpt.read_header(inputs.source).model
    if candidates is None:
        candidates = search_candidates(src, inputs.budget, cfg.search, inputs.prune)
    scores = load_scores(inputs.scores, "search.scores")
    plans = []
    for c in candidates:  # every plan checked before hours of pruning and training
        pc = c.prune_config(inputs.prune)
        plans.append(make_plan(src, resolve_target(src, pc), scores, pc))
    inputs.output.mkdir(parents=True, exist_ok=True)
    if is_rank0():
        atomic_files.write_json(inputs.output / "candidates.json",
                                [dataclasses.asdict(c) for c in candidates], indent=2)
    ranking = rank_rows([run_candidate(cfg, inputs, c, p.target, p.layers)
                         for c, p in zip(candidates, plans)])
    stem = "ranking_zero_shot" if cfg.search.zero_shot else "ranking"
    out_json, out_md = inputs.output / f"{stem}.json", inputs.output / f"{stem}.md"
    table = ranking_table(ranking, cfg.search.metric)
    how = ("zero-shot (right after pruning)" if cfg.search.zero_shot else
           f"after {ranking[0]['iters']} distillation steps ({ranking[0]['tokens']:,} tokens)")
    if is_rank0():
        atomic_files.write_json(out_json, ranking, indent=2)
        atomic_files.write_text(out_md, f"# Architecture search: {len(ranking)} candidates, budget "
                          f"{inputs.budget:,} parameters\n\nValidation loss {how}.\n\n{table}")
        print(table, end="")
    return SearchResult(ranking[0], ranking, out_json, out_md)
