"""The papers' claims as rules evaluated on the study's numbers: each rule reads the finished arms
of one ablation and says "held", "did not hold", or "not run" (an arm it needs is missing)."""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

Arms = Dict[str, Dict]
"""Arm name -> its result record (only arms with status "done")."""


@dataclass(frozen=True)
class Claim:
    ablation: int
    text: str
    """The claim as the papers make it (Minitron: arXiv 2407.14679; in practice: 2408.11796)."""
    rule: Callable[[Arms], Optional[Tuple[bool, str]]]
    """(held, evidence) from the arms, None when an arm it needs did not run."""


def _get(arms: Arms, name: str, field: str = "loss") -> Optional[float]:
    return arms.get(name, {}).get(field)


def _order(names: List[str], field: str) -> Callable[[Arms], Optional[Tuple[bool, str]]]:
    """Strictly increasing `field` in the order given (lower loss is better)."""
    def rule(arms):
        vals = [_get(arms, n, field) for n in names]
        if any(v is None for v in vals):
            return None
        held = all(a < b for a, b in zip(vals, vals[1:]))
        return held, ", ".join(f"{n} {v:.3f}" for n, v in zip(names, vals))
    return rule


def _at_most(name: str, other: str) -> Callable[[Arms], Optional[Tuple[bool, str]]]:
    """`name` is at least as good as `other` (final loss)."""
    def rule(arms):
        a, b = _get(arms, name), _get(arms, other)
        if a is None or b is None:
            return None
        return a <= b, f"{name} {a:.3f}, {other} {b:.3f}"
    return rule


def _best(name: str, field: str) -> Callable[[Arms], Optional[Tuple[bool, str]]]:
    def rule(arms):
        vals = {n: r[field] for n, r in arms.items() if r.get(field) is not None}
        if name not in vals or len(vals) < 2:
            return None
        best = min(vals, key=vals.get)
        return best == name, f"{name} {vals[name]:.3f}; best {best} {vals[best]:.3f}"
    return rule


def tokens_to_match(scratch: Dict, target: float) -> Optional[int]:
    """The fewest tokens at which the random-init arm's loss is at or below `target`: its
    equal-token run, else the first checkpoint of its long run (None: never)."""
    if scratch["loss"] <= target:
        return scratch["tokens"]
    return next((c["tokens"] for c in scratch["curve"] if c["loss"] <= target), None)


def _scratch_tokens(arms: Arms) -> Optional[Tuple[bool, str]]:
    kd, rnd = arms.get("width"), arms.get("random_init")
    if not kd or not rnd:
        return None
    match = tokens_to_match(rnd, kd["loss"])
    if match is None:
        most = rnd["tokens_trained"]
        return True, (f"random init did not reach {kd['loss']:.3f} within {most:,} tokens "
                      f"(> {most / kd['tokens']:.0f}x the student's {kd['tokens']:,})")
    return match > kd["tokens"], (f"random init matched at {match:,} tokens, "
                                  f"{match / kd['tokens']:.1f}x the student's {kd['tokens']:,}")


def _calibration_stable(arms: Arms) -> Optional[Tuple[bool, str]]:
    done = sorted((int(n[1:]), r["pruned_loss"]) for n, r in arms.items())
    if len(done) < 2:
        return None
    (n1, a), (n2, b) = done[-2], done[-1]
    return abs(a - b) <= 0.01 * b, f"n={n1}: {a:.3f}, n={n2}: {b:.3f} (1% tolerance)"


def _more_calibration(arms: Arms) -> Optional[Tuple[bool, str]]:
    done = sorted((int(n[1:]), r["pruned_loss"]) for n, r in arms.items())
    if len(done) < 2:
        return None
    (n1, a), (n2, b) = done[0], done[-1]
    return b < a, f"n={n1}: {a:.3f}, n={n2}: {b:.3f}"


def _flip(arms: Arms) -> Optional[Tuple[bool, str]]:
    w, d = arms.get("width"), arms.get("depth")
    if not w or not d:
        return None
    return (d["pruned_loss"] < w["pruned_loss"] and w["loss"] < d["loss"],
            f"after pruning width {w['pruned_loss']:.3f} / depth {d['pruned_loss']:.3f}; after "
            f"distillation width {w['loss']:.3f} / depth {d['loss']:.3f}")


def _loss_beats_cosine(arms: Arms) -> Optional[Tuple[bool, str]]:
    vals = [_get(arms, n) for n in ("loss", "block", "cosine")]
    if any(v is None for v in vals):
        return None
    return min(vals[:2]) < vals[2], (f"loss {vals[0]:.3f}, block {vals[1]:.3f}, "
                                     f"cosine {vals[2]:.3f}")


CLAIMS = [
    Claim(1, "Mean over the sequence then L2 over the batch is the best aggregation.",
          _best("seq_mean_batch_l2", "pruned_loss")),
    Claim(2, "Activation-based importance beats magnitude, which beats random, right after "
             "pruning.", _order(["activation", "magnitude", "random"], "pruned_loss")),
    Claim(2, "The same order holds after a short distillation.",
          _order(["activation", "magnitude", "random"], "loss")),
    Claim(3, "Width pruning beats depth pruning at equal parameters after distillation.",
          _order(["width", "depth"], "loss")),
    Claim(3, "The order flips with retraining: depth ahead right after pruning, width after "
             "distillation.", _flip),
    Claim(4, "Loss-based layer importance (single layer or contiguous block) beats cosine.",
          _loss_beats_cosine),
    Claim(4, "Dropping the best contiguous block beats dropping the lowest-scored single "
             "layers.", _order(["block", "loss"], "loss")),
    Claim(5, "Pruning query heads uniformly inside groups beats dropping whole groups.",
          _order(["heads", "groups"], "loss")),
    Claim(6, "Logit KD beats cross-entropy retraining on the same tokens.",
          _order(["kd", "ce"], "loss")),
    Claim(6, "Adding cross entropy to logit KD does not help (KD alone is at least as good).",
          _at_most("kd", "kd_ce")),
    Claim(6, "Logit + hidden-state losses beat logit-only KD.",
          _order(["kd_hidden", "kd"], "loss")),
    Claim(6, "Temperature 1 beats temperature 2.", _order(["kd", "kd_t2"], "loss")),
    Claim(7, "The pruned + distilled student beats the same architecture trained from random "
             "init on the same tokens.", _order(["width", "random_init"], "loss")),
    Claim(7, "Random init needs more tokens than distillation to reach the student's loss "
             "(papers: up to 40x).", _scratch_tokens),
    Claim(8, "One-shot pruning is at least as good as iterative pruning to the same size.",
          _at_most("one_shot", "iterative")),
    Claim(9, "More calibration samples give a lower loss after pruning.", _more_calibration),
    Claim(9, "Scores are stable at the largest calibration sizes (the paper: 1024 suffice).",
          _calibration_stable),
]


def evaluate_claims(done: Dict[int, Arms]) -> List[Dict]:
    """One record per claim: ablation, claim, verdict, evidence."""
    out = []
    for c in CLAIMS:
        r = c.rule(done.get(c.ablation, {}))
        verdict = "not run" if r is None else ("held" if r[0] else "did not hold")
        out.append({"ablation": c.ablation, "claim": c.text, "verdict": verdict,
                    "evidence": "" if r is None else r[1]})
    return out
