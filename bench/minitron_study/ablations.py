"""The nine ablations of issue 8 and a tenth, the seed spread that sizes their noise; each is a
list of arms, an arm a few Hydra overrides on the study's base config plus how the pruned model
is retrained. Arms that need the same scores file or pruned checkpoint get the same one
(artifacts.py keys them by their config)."""

from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

from megatron_minitron.config.model import ModelConfig
from megatron_minitron.pruning.budget import count
from minitron_study.config import BudgetSizes

RETRAIN = ("none", "kd", "ce", "scratch")


@dataclass(frozen=True)
class Arm:
    name: str
    """Unique within its ablation; the result file is arms/<ablation key>/<name>.json."""
    overrides: Tuple[str, ...] = ()
    """Hydra overrides on the base config (conf/experiment/study_<budget>.yaml)."""
    retrain: str = "none"
    """"none": evaluate right after pruning; "kd": pipeline.distill_iters steps of distillation
    (per round split over pipeline.iterations); "ce": the same steps of plain LM loss;
    "scratch": the pruned architecture from random init, LM loss, scratch_factor x as long."""
    revision: int = 0
    """Raised when a code fix changes what the arm measures while its overrides stay the same:
    a result recorded under another revision reruns."""


@dataclass(frozen=True)
class Ablation:
    number: int
    key: str
    title: str
    question: str
    arms: List[Arm] = field(default_factory=list)


def _depth(s: BudgetSizes, layers: int) -> Tuple[str, ...]:
    """Keep `layers` layers, scored by skip-one loss, cosine and contiguous-block loss (the
    same scores file for every depth arm: block_sizes stays the budget's)."""
    return (f"prune.target.num_layers={layers}", "importance.depth_loss=true",
            f"importance.num_samples={s.depth_samples}",
            f"importance.block_sizes=[{s.depth_layers}]")


def equal_total_layers(teacher: ModelConfig, params: int) -> int:
    """The teacher's layer count whose total parameters (embeddings included) are nearest to
    `params` (ties: fewer layers). SmolLM2-135M: 28.3M tied embeddings + 3.54M per layer, so the
    width student's 71.1M gives 12 layers (70.8M)."""
    return min(range(1, teacher.num_layers + 1),
               key=lambda n: abs(count(teacher, {"num_layers": n}, True) - params))


def replicate(arm: Arm, seed: int) -> Arm:
    """`arm` again under runtime.seed=`seed` (other calibration samples, another training
    order; the same held-out batches): a seed replicate for a claim within noise."""
    return replace(arm, name=f"{arm.name}_seed{seed}",
                   overrides=arm.overrides + (f"runtime.seed={seed}",))


def build_ablations(s: BudgetSizes, depth_layers: Optional[int] = None) -> List[Ablation]:
    """`depth_layers`: the layers ablation 3's depth arm keeps, equal in total parameters to the
    width arm (equal_total_layers; the runner computes it from the teacher). None, before the
    teacher is known: the budget's depth_layers."""
    depth_layers = s.depth_layers if depth_layers is None else depth_layers

    def after(n: int) -> str:
        return "kd" if n in s.distill_after_prune else "none"

    pairs = "[" + ",".join(f"[{t},{u}]" for t, u in s.hidden_pairs) + "]"
    width_kd = Arm("width", retrain="kd")  # the default student: shared by 2, 3, 6, 7 and 8
    return [
        Ablation(1, "aggregation", "Importance aggregation",
                 "Which (sequence, batch) reduction of activations ranks best? Loss right after "
                 "width pruning.",
                 [Arm(f"seq_{q}_batch_{b}", (f"importance.seq_aggregation={q}",
                                             f"importance.sample_aggregation={b}"))
                  for q, b in s.aggregations]),
        Ablation(2, "source", "Importance source",
                 "Activation scores versus weight magnitude versus random, after pruning and "
                 "after a short distillation.",
                 [Arm(src, (f"importance.source={src}",), "kd")
                  for src in ("activation", "magnitude", "random")]),
        Ablation(3, "width_depth", "Width versus depth at equal parameters",
                 "Half the non-embedding parameters by width (hidden, ffn), or as many layers "
                 "by depth (skip-one loss) as give the same total parameters, embeddings "
                 "included; before and after distillation.",
                 [width_kd, Arm("depth", _depth(s, depth_layers), "kd")]),
        Ablation(4, "depth_metric", "Depth metric",
                 "Which half of the layers to drop: lowest cosine block importance, lowest "
                 "single-layer loss increase, or the best contiguous block.",
                 [Arm("cosine", _depth(s, s.depth_layers) + ("prune.depth_metric=cosine",),
                      after(4)),
                  Arm("loss", _depth(s, s.depth_layers), after(4)),
                  Arm("block", _depth(s, s.depth_layers) + ("prune.depth_mode=block",),
                      after(4))]),
        Ablation(5, "heads", "Heads: inside groups versus whole groups",
                 f"Keep {s.kept_heads} query heads: uniformly inside every group, or by dropping "
                 "whole query groups (the latter also drops their key/value heads). "
                 "heads_projected ranks heads inside groups by what they write through "
                 "linear_proj instead of by their attention output (importance.head_score).",
                 [Arm(mode, (f"prune.target.num_attention_heads={s.kept_heads}",
                             f"prune.head_mode={mode}"), after(5))
                  for mode in ("heads", "groups")]
                 + [Arm("heads_projected", (f"prune.target.num_attention_heads={s.kept_heads}",
                                            "prune.head_mode=heads",
                                            "importance.head_score=projected"), after(5))]),
        Ablation(6, "retraining", "Retraining losses",
                 "The width-pruned student retrained for the same tokens by logit KD, plain "
                 "cross entropy, KD + CE, KD + hidden-state cosine, KD at temperature 2.",
                 [Arm("kd", retrain="kd"), Arm("ce", retrain="ce"),
                  Arm("kd_ce", ("distill.ce_weight=1.0",), "kd"),
                  Arm("kd_hidden", ("distill.hidden_loss=cosine", f"distill.layer_pairs={pairs}"),
                      "kd"),
                  Arm("kd_t2", ("distill.temperature=2.0",
                                "distill.scale_by_temperature_squared=true"), "kd")]),
        Ablation(7, "scratch", "Pruned + distilled versus random init",
                 f"The width-pruned architecture from random init, trained {s.scratch_factor}x "
                 "the distillation's tokens: its loss at equal tokens and the tokens it needs to "
                 "match the distilled student.",
                 [width_kd, Arm("random_init", retrain="scratch")]),
        Ablation(8, "iterative", "One-shot versus iterative pruning",
                 "The same final architecture in one prune + distill, or two rounds (geometric "
                 "budgets, the last one pruning to the one-shot sizes) that split the same "
                 "distillation steps.",
                 [Arm("one_shot", retrain="kd"),
                  # revision 1: the last round prunes to exactly one_shot's architecture
                  Arm("iterative", ("pipeline.iterations=2",), "kd", revision=1)]),
        Ablation(9, "calibration", "Calibration size",
                 "Activation scores from more or fewer calibration samples, for width pruning.",
                 [Arm(f"n{n}", (f"importance.num_samples={n}",), after(9))
                  for n in s.calibration]),
        Ablation(10, "seeds", "Seed-to-seed spread",
                 "The default student again with other seeds (other calibration samples, "
                 "another training order; the same held-out batches). The spread of these "
                 "losses is the yardstick of the claims table: a verdict that a smaller change "
                 "would reverse is reported as within noise.",
                 [width_kd] + [Arm(f"seed{n}", (f"runtime.seed={n}",), "kd") for n in s.seeds]),
    ]

