"""The papers' claims as rules evaluated on the study's numbers: each rule reads the finished arms
of one ablation and says "held", "did not hold", or "not run" (an arm it needs is missing).

A rule also gives its margin: how far one of the compared losses would have to move to reverse
the verdict. Where the seed-to-seed spread of the same student (ablation 10: range of its losses
over seeds, right after pruning or after retraining, whichever the claim compares) is larger
than that margin, one seed cannot tell: the study reruns every compared arm under the budget's
other seeds (its second pass) and judges the claim again on each arm's mean over the seeds,
against the larger of the compared arms' own seed ranges. Until those replicates have run, the
claim is "not run"; if the means still differ by less than that range, "within noise".

A claim that two losses are equal (calibration stability) holds when they differ by no more
than the seed spread; width versus depth is "not comparable" when the two arms' total
parameters differ by more than one of the teacher's layers."""

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

Arms = Dict[str, Dict]
"""Arm name -> its result record (only arms with status "done")."""
Replicates = Dict[int, Dict[str, List[Dict]]]
"""Ablation -> arm name -> the finished records of its seed replicates."""


PRUNED, RETRAINED = "pruned", "retrained"
"""Which seed spread applies: losses right after pruning, or after retraining."""
SEEDS = 10
"""The ablation whose arms are the default student under several seeds."""


@dataclass(frozen=True)
class Outcome:
    held: bool
    evidence: str
    margin: Optional[float] = None
    """The smallest change of one compared loss that reverses the verdict (None: not measured
    in loss, like the token count to match)."""
    kind: str = RETRAINED
    compared: Tuple[str, ...] = ()
    """The arms the verdict turns on: the ones a within-noise verdict replicates."""
    difference: Optional[float] = None
    """Set for a claim that two losses are equal: their difference, held when the seed spread
    covers it."""
    not_comparable: Optional[str] = None
    """Why the compared arms cannot be compared (then no verdict)."""


@dataclass(frozen=True)
class Claim:
    ablation: int
    text: str
    """The claim as the papers make it (Minitron: arXiv 2407.14679; in practice: 2408.11796)."""
    rule: Callable[[Arms], Optional[Outcome]]
    """The outcome from the arms, None when an arm it needs did not run."""


def _get(arms: Arms, name: str, field: str = "loss") -> Optional[float]:
    return arms.get(name, {}).get(field)


def _kind(arms: Arms, names: List[str], field: str) -> str:
    """Arms that did not retrain report their loss after pruning as their loss."""
    if field == "pruned_loss" or all(arms[n].get("tokens") == 0 for n in names):
        return PRUNED
    return RETRAINED


def reversal_margin(vals: List[float], strict: bool = True) -> float:
    """For the claim "vals increase (strictly, or not decreasing)": how far one value has to move
    to reverse the verdict. Held: the smallest step (one move closes it). Not held: every
    violated step must be undone, and two neighbours moving split a gap, so the largest one."""
    steps = [b - a for a, b in zip(vals, vals[1:])]
    ok = [d > 0 if strict else d >= 0 for d in steps]
    if all(ok):
        return min(steps)
    return max(-d for d, good in zip(steps, ok) if not good)


def _order(names: List[str], field: str) -> Callable[[Arms], Optional[Outcome]]:
    """Strictly increasing `field` in the order given (lower loss is better)."""
    def rule(arms):
        vals = [_get(arms, n, field) for n in names]
        if any(v is None for v in vals):
            return None
        held = all(a < b for a, b in zip(vals, vals[1:]))
        return Outcome(held, ", ".join(f"{n} {v:.3f}" for n, v in zip(names, vals)),
                       reversal_margin(vals), _kind(arms, names, field), tuple(names))
    return rule


def _at_most(name: str, other: str) -> Callable[[Arms], Optional[Outcome]]:
    """`name` is at least as good as `other` (final loss)."""
    def rule(arms):
        a, b = _get(arms, name), _get(arms, other)
        if a is None or b is None:
            return None
        return Outcome(a <= b, f"{name} {a:.3f}, {other} {b:.3f}",
                       reversal_margin([a, b], strict=False), _kind(arms, [name, other], "loss"),
                       (name, other))
    return rule


def _best(name: str, field: str) -> Callable[[Arms], Optional[Outcome]]:
    def rule(arms):
        vals = {n: r[field] for n, r in arms.items() if r.get(field) is not None}
        if name not in vals or len(vals) < 2:
            return None
        best = min(vals, key=vals.get)
        rival = min((n for n in vals if n != name), key=vals.get)
        return Outcome(best == name, f"{name} {vals[name]:.3f}; best {best} {vals[best]:.3f}",
                       abs(vals[rival] - vals[name]), _kind(arms, list(vals), field),
                       (name, rival))
    return rule


def tokens_to_match(scratch: Dict, target: float) -> Optional[int]:
    """The fewest tokens at which the random-init arm's loss is at or below `target`: its
    equal-token run, else the first checkpoint of its long run (None: never)."""
    if scratch["loss"] <= target:
        return scratch["tokens"]
    return next((c["tokens"] for c in scratch["curve"] if c["loss"] <= target), None)


def _scratch_tokens(arms: Arms) -> Optional[Outcome]:
    kd, rnd = arms.get("width"), arms.get("random_init")
    if not kd or not rnd:
        return None
    match = tokens_to_match(rnd, kd["loss"])
    if match is None:
        most = rnd["tokens_trained"]
        return Outcome(True, f"random init did not reach {kd['loss']:.3f} within {most:,} "
                       f"tokens (> {most / kd['tokens']:.0f}x the student's {kd['tokens']:,})")
    return Outcome(match > kd["tokens"], f"random init matched at {match:,} tokens, "
                   f"{match / kd['tokens']:.1f}x the student's {kd['tokens']:,}")


def _calibration_stable(arms: Arms) -> Optional[Outcome]:
    """The two largest sizes give the same loss: equal within the seed spread after pruning."""
    done = sorted((int(n[1:]), r["pruned_loss"]) for n, r in arms.items())
    if len(done) < 2:
        return None
    (n1, a), (n2, b) = done[-2], done[-1]
    return Outcome(True, f"n={n1}: {a:.3f}, n={n2}: {b:.3f} (difference {abs(a - b):.3f})",
                   kind=PRUNED, compared=(f"n{n1}", f"n{n2}"), difference=abs(a - b))


def _more_calibration(arms: Arms) -> Optional[Outcome]:
    done = sorted((int(n[1:]), r["pruned_loss"]) for n, r in arms.items())
    if len(done) < 2:
        return None
    (n1, a), (n2, b) = done[0], done[-1]
    return Outcome(b < a, f"n={n1}: {a:.3f}, n={n2}: {b:.3f}", reversal_margin([b, a]), PRUNED,
                   (f"n{n1}", f"n{n2}"))


def _flip(arms: Arms) -> Optional[Outcome]:
    """Two comparisons: with depth ahead right after pruning the order after retraining decides
    (its margin is the margin); without, the order after pruning already refutes it."""
    w, d = arms.get("width"), arms.get("depth")
    if not w or not d:
        return None
    held = d["pruned_loss"] < w["pruned_loss"] and w["loss"] < d["loss"]
    evidence = (f"after pruning width {w['pruned_loss']:.3f} / depth {d['pruned_loss']:.3f}; "
                f"after distillation width {w['loss']:.3f} / depth {d['loss']:.3f}")
    if d["pruned_loss"] < w["pruned_loss"]:  # decided by the order after retraining
        return Outcome(held, evidence, reversal_margin([w["loss"], d["loss"]]),
                       compared=("width", "depth"))
    return Outcome(held, evidence, reversal_margin([d["pruned_loss"], w["pruned_loss"]]), PRUNED,
                   ("width", "depth"))


def _params(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{int(n):,}"


def _equal_params(rule: Callable[[Arms], Optional[Outcome]]) -> Callable[[Arms],
                                                                        Optional[Outcome]]:
    """Width against depth only at equal total parameters: both arms' totals in the evidence,
    and "not comparable" when they differ by more than one of the depth arm's (the teacher's)
    layers."""
    def wrapped(arms):
        out = rule(arms)
        if out is None:
            return None
        w, d = arms["width"], arms["depth"]
        layer = d.get("layer_params") or \
            d["params_non_embedding"] / d["architecture"]["num_layers"]
        gap = abs(w["params"] - d["params"])
        evidence = (f"{out.evidence} (total params: width {_params(w['params'])}, depth "
                    f"{_params(d['params'])})")
        problem = None if gap <= layer else (
            f"the totals differ by {_params(gap)}, more than one layer ({_params(layer)})")
        return replace(out, evidence=evidence, not_comparable=problem)
    return wrapped


def _loss_beats_cosine(arms: Arms) -> Optional[Outcome]:
    names = ["loss", "block", "cosine"]
    vals = [_get(arms, n) for n in names]
    if any(v is None for v in vals):
        return None
    return Outcome(min(vals[:2]) < vals[2], f"loss {vals[0]:.3f}, block {vals[1]:.3f}, "
                   f"cosine {vals[2]:.3f}", reversal_margin([min(vals[:2]), vals[2]]),
                   _kind(arms, names, "loss"), tuple(names))


CLAIMS = [
    Claim(1, "Mean over the sequence then L2 over the batch is the best aggregation.",
          _best("seq_mean_batch_l2", "pruned_loss")),
    Claim(2, "Activation-based importance beats magnitude, which beats random, right after "
             "pruning.", _order(["activation", "magnitude", "random"], "pruned_loss")),
    Claim(2, "The same order holds after a short distillation.",
          _order(["activation", "magnitude", "random"], "loss")),
    Claim(3, "Width pruning beats depth pruning at equal parameters after distillation.",
          _equal_params(_order(["width", "depth"], "loss"))),
    Claim(3, "The order flips with retraining: depth ahead right after pruning, width after "
             "distillation.", _equal_params(_flip)),
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


def seed_spread(done: Dict[int, Arms]) -> Dict[str, float]:
    """{"pruned": range of the loss right after pruning, "retrained": range of the loss after
    retraining} over the seeds of ablation 10; empty with fewer than two finished seeds."""
    arms = list(done.get(SEEDS, {}).values())
    if len(arms) < 2:
        return {}
    out = {}
    for kind, field in ((PRUNED, "pruned_loss"), (RETRAINED, "loss")):
        vals = [r[field] for r in arms]
        out[kind] = max(vals) - min(vals)
    return out


def _field(kind: str) -> str:
    return "pruned_loss" if kind == PRUNED else "loss"


def judge(outcome: Optional[Outcome], noise: Optional[float]) -> Tuple[str, Optional[float]]:
    """(verdict, margin) of an outcome against a noise yardstick (None: none measured)."""
    if outcome is None:
        return "not run", None
    if outcome.not_comparable:
        return "not comparable", outcome.margin
    if outcome.difference is not None:  # a claim of equality
        if noise is None:
            return "not run", None
        held = outcome.difference <= noise
        return ("held" if held else "did not hold"), abs(noise - outcome.difference)
    if outcome.margin is not None and noise is not None and outcome.margin < noise:
        return "within noise", outcome.margin
    return ("held" if outcome.held else "did not hold"), outcome.margin


def _mean(records: List[Dict]) -> Dict:
    """The first record with its losses replaced by their means over the records."""
    out = dict(records[0])
    for f in ("loss", "pruned_loss"):
        out[f] = sum(r[f] for r in records) / len(records)
    return out


def _over_seeds(claim: Claim, first: Outcome, arms: Arms, reps: Dict[str, List[Dict]],
                seeds: int) -> Dict:
    """The claim judged on the means over seeds of its compared arms, against the larger of
    their seed ranges; "not run" until every compared arm has `seeds` finished runs."""
    runs = {n: [arms[n]] + reps.get(n, []) for n in first.compared}
    lean = "held" if first.held else "did not hold"
    if any(len(v) < seeds for v in runs.values()):
        missing = [n for n, v in runs.items() if len(v) < seeds]
        return {"verdict": "not run", "evidence": f"one seed: {first.evidence}, within noise "
                f"(leans {lean}); the seed replicates of {', '.join(missing)} have not run",
                "leaning": lean}
    out = claim.rule({n: _mean(v) for n, v in runs.items()})
    field = _field(out.kind)
    noise = max(max(r[field] for r in v) - min(r[field] for r in v) for v in runs.values())
    verdict, margin = judge(out, noise)
    per_seed = "; ".join(f"{n} " + " / ".join(f"{r[field]:.3f}" for r in v)
                         for n, v in runs.items())
    order = "/".join(str(r.get("seed", "base")) for r in next(iter(runs.values())))
    return {"verdict": verdict, "leaning": "held" if out.held else "did not hold",
            "evidence": f"means over {seeds} seeds: {out.evidence}; per seed ({order}): "
                        f"{per_seed}",
            "margin": margin, "spread": noise, "seeds": {n: [r[field] for r in v]
                                                         for n, v in runs.items()}}


def evaluate_claims(done: Dict[int, Arms], replicates: Optional[Replicates] = None,
                    seeds: int = 3) -> List[Dict]:
    """One record per claim: ablation, claim, verdict, evidence, margin, the spread it met, and
    `replicate`: the arms to rerun under other seeds (its verdict on one seed was within noise;
    judged on `seeds` seeds once `replicates` holds them)."""
    spread = seed_spread(done)
    out = []
    for c in CLAIMS:
        arms = done.get(c.ablation, {})
        r = c.rule(arms)
        noise = None if r is None else spread.get(r.kind)
        verdict, margin = judge(r, noise)
        rec = {"ablation": c.ablation, "claim": c.text, "verdict": verdict,
               "evidence": "" if r is None else r.evidence,
               "leaning": None if r is None else ("held" if r.held else "did not hold"),
               "margin": margin, "spread": None if margin is None else noise, "replicate": []}
        if r is not None and r.not_comparable:
            rec["evidence"] += f"; not comparable: {r.not_comparable}"
        if verdict == "within noise":
            rec["replicate"] = list(r.compared)
            rec.update(_over_seeds(c, r, arms, (replicates or {}).get(c.ablation, {}), seeds))
        out.append(rec)
    return out
