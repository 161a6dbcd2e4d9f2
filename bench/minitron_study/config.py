"""The study's own knobs: which budget, where results go, and the sizes that budget implies.
Everything about the model, data and training lives in the base MinitronConfig, composed from
conf/experiment/study_<budget>.yaml; each arm varies it by a few Hydra overrides."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError

BUDGETS = ("tiny", "quick", "full")


@dataclass
class StudyConfig:
    """`python bench/study.py budget=quick`: the nine Minitron ablations of issue 8."""

    budget: str = "quick"
    """"tiny": the smoke model, plumbing only (tests); "quick": SmolLM2-135M, under an hour on a
    2-core CPU for the first pass (the seed replicates of claims within noise come on top);
    "full": the issue's sizes, for a GPU."""
    dir: Optional[str] = None
    """Study folder (shared artifacts and one JSON per finished arm). None: runs/study_<budget>."""
    docs_dir: Optional[str] = None
    """Where RESULTS.md, results.json and the plots go. None: docs/ for quick and full, the
    study folder for tiny (so the test never touches the repository's docs)."""
    ablations: List[int] = field(default_factory=lambda: list(range(1, 11)))
    """Which ablations (1-9, and 10: the seed-to-seed spread that sizes "within noise") to run
    now; the report shows every finished arm regardless."""
    overrides: List[str] = field(default_factory=list)
    """Extra Hydra overrides applied to the base config of every arm."""

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise ConfigError("budget", f"unknown {self.budget!r}", f"use one of {BUDGETS}")
        bad = [a for a in self.ablations if not 1 <= a <= 10]
        if bad:
            raise ConfigError("ablations", f"{bad} are not ablations", "use numbers 1 to 10")

    @property
    def study_dir(self) -> str:
        return self.dir or f"runs/study_{self.budget}"

    @property
    def output_dir(self) -> str:
        if self.docs_dir:
            return self.docs_dir
        return f"{self.study_dir}/docs" if self.budget == "tiny" else "docs"

    @property
    def sizes(self) -> "BudgetSizes":
        return SIZES[self.budget]


@dataclass(frozen=True)
class BudgetSizes:
    """What shrinks between budgets besides the base config (arms dropped say so in the report)."""

    depth_layers: int
    """Layers kept by the depth-metric arms (ablation 4): half the teacher's, half its
    non-embedding parameters. Ablation 3's depth arm keeps instead as many layers as give the
    width arm's total parameters, embeddings included (ablations.equal_total_layers)."""
    kept_heads: int
    """Query heads kept by the head-pruning arms (a multiple of the groups that survive)."""
    calibration: List[int]
    """importance.num_samples of the calibration-size arms."""
    depth_samples: int
    """Calibration samples for the depth scores (one forward pass per layer and per block)."""
    aggregations: List[List[str]]
    """[seq_aggregation, sample_aggregation] pairs of ablation 1."""
    scratch_factor: int
    """The random-init model trains this many times the distillation's tokens (ablation 7)."""
    scratch_points: int
    """Evenly spaced checkpoints of the long random-init run that are evaluated."""
    hidden_pairs: List[List[int]]
    """[teacher_layer, student_layer] pairs of the hidden-state arm (ablation 6)."""
    note: str
    """What this budget cuts from the issue's design (printed at the top of RESULTS.md)."""
    distill_after_prune: List[int]
    """Which of ablations 4, 5 and 9 also distill their arms (the others: loss right after
    pruning only)."""
    seeds: List[int] = field(default_factory=lambda: [2, 3])
    """runtime.seed of the extra runs of the default student (ablation 10): other calibration
    samples and another training order, scored on the same held-out batches. Also the seeds of
    the replicates that every arm compared by a claim within noise gets (a second pass of the
    study), so such a claim is judged on 1 + len(seeds) seeds: 3 for quick and full; tiny has
    one extra seed, so its replicates (plumbing only) judge on 2."""


_ALL_AGG = [[s, b] for s in ("mean", "l2", "var") for b in ("mean", "l2", "var")]

SIZES = {
    "tiny": BudgetSizes(depth_layers=2, kept_heads=2, calibration=[4, 8, 16], depth_samples=8,
                        aggregations=[["mean", "l2"], ["l2", "mean"]], scratch_factor=2,
                        scratch_points=2, hidden_pairs=[[2, 2], [4, 4]],
                        note="plumbing only: a random 4-layer teacher, 2 distillation steps; "
                        "the numbers mean nothing; one extra seed, so claims within noise are "
                        "judged on 2 seeds, not 3", distill_after_prune=[], seeds=[2]),
    "quick": BudgetSizes(depth_layers=15, kept_heads=6, calibration=[16, 64, 256],
                         depth_samples=16,
                         aggregations=_ALL_AGG,
                         scratch_factor=4, scratch_points=4, hidden_pairs=[[15, 15], [30, 30]],
                         note="calibration sizes 16/64/256 instead of 64/256/1024 and depth "
                         "scores from 16 samples (one forward pass per layer and per block), so "
                         "scoring fits a 2-core CPU; ablations 4 and 9 report the loss right "
                         "after pruning only (5 also distills); random init trains 4x the "
                         "student's tokens, not 40x", distill_after_prune=[5]),
    "full": BudgetSizes(depth_layers=15, kept_heads=6, calibration=[64, 256, 1024],
                        depth_samples=128, aggregations=_ALL_AGG, scratch_factor=40,
                        scratch_points=10, hidden_pairs=[[15, 15], [30, 30]],
                        note="the issue's design in full", distill_after_prune=[4, 5, 9]),
}
