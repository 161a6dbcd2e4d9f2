"""Quality per training token: our pipeline's distillation against naive recipes, on held-out
text none of the arms trains on (bench/heldout_texts.py: The Tempest, The Devil's Dictionary,
Webster 1913, the Jargon File), at equal tokens, over seeds.

Teacher: SmolLM2-135M (bench/smollm2.py). Students: ours = the teacher pruned to half its
non-embedding parameters by our importance + prune stages (hidden 378, ffn 1031, 9 heads, 30
layers); ref = the same shape from a plain transformers reference implementation of the
Minitron activation method (bench/reference_prune.py, same 64 x 256 calibration samples).
Arms, each trained on `tokens` demo-corpus tokens (the same samples in the same order for a
given seed: the seed sets data order and any random init):

    ours        our student + `minitron distill` with the recipe under test (the knobs mbs, gbs,
                lr, min_lr_ratio, decay, warmup, kd, ce, T, axes; default: CHOSEN below, the
                demo's); axes prunes to the same non-embedding budget over other axes than
                hidden + ffn first: "depth" (15 of 30 layers by layer cosine) or a comma
                list of prune.budget_axes ("width": the hidden + ffn student)
    manual      our student + `minitron distill`, 4 x 256 per step, constant lr 3e-4, no warmup
    demo        our student + `minitron distill` with the demo's recipe before issue 15
                (8 x 256 per step, lr 1e-3 cosine to 1e-4, 5 warmup steps)
    naive_ref   (a) the naive transformers KD loop (bench/kd_vs_hf.py: forward KL at T=1, AdamW
                at a constant 3e-4, 4 x 256 per step) from the reference student
    ce_ref      (b) the same loop with cross entropy instead of KD, from the reference student
    naive_ours  (c) the naive KD loop from our student
    naive_depth (c) again from our depth student (15 of 30 layers by layer cosine: the one
                the `ours` arm's default recipe trains), so that the depth cut and our
                distillation are told apart

    python bench/recipe_vs_naive.py [tokens=40960] [seeds=1,2,3] [arms=ours,manual,...]
        [split=report|select] [windows=10] [threads=2] [work=/tmp/minitron_bench_smollm2]
        [recipe knobs] [axes=depth|width|<budget axes>] [teacher=smollm2|gemma3_270m]

teacher=gemma3_270m: the real Gemma 3 270M (bench/smollm2.py; work defaults to
/tmp/minitron_bench_gemma3), our student is `experiment=gemma3_270m`'s prune.target (hidden,
ffn and query heads; axes is unused), ref the same shape from bench/reference_prune.py (its
query heads by the norm of their attention output), every held-out window starts with <bos>
as Gemma expects; arms, recipe knobs and verdicts as above.

score: which halves each trained student is scored on (select,report: both; a run cached
with fewer halves is not rescored). threads: torch's intra-op threads of every arm (fp32
throughout); starts=false leaves out the rows of the teacher and the two just-pruned
students (three more models to score); on a 2-core machine shared with other jobs threads=1 ran a Hugging Face forward
2x faster than threads=2 (wall time).

Perplexity: Hugging Face transformers forward in fp32 of every trained student (ours exported
with `mcore_to_hf`), on `windows` non-overlapping 256-token windows from the first half of each
text (split=select: for choosing knobs) or from its second half (split=report: the reported
table; never used to choose). Every finished run is saved as JSON under
<work>/recipe_runs and reused; training folders are deleted after scoring. Prints per arm the
mean perplexity and the min-max range over seeds, then for each comparison of `ours` and each
text: "beats X by more than the spread" (mean gap larger than the larger of the two ranges),
"within noise", or "worse".
"""

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heldout_texts  # noqa: E402
import smollm2  # noqa: E402
from knobs import parse_knobs  # noqa: E402

SEQ = 256
RECIPE = {"mbs": 4, "gbs": 4, "lr": 3e-4, "min_lr_ratio": 0.1, "decay": "constant",
          "warmup": 0, "kd": 1.0, "ce": 0.0, "T": 1.0}
"""Issue 15's manual try (4 x 256 per step, constant lr 3e-4, no warmup, forward KL at T=1): the
`manual` arm and bench/recipe_sweep.py's start. The `ours` arm's default is CHOSEN."""
NAMED = {"manual": dict(RECIPE, mbs=4, gbs=4, lr=3e-4, decay="constant", warmup=0, kd=1.0,
                        ce=0.0, T=1.0),
         "demo": dict(RECIPE, mbs=4, gbs=8, lr=1e-3, min_lr_ratio=0.1, decay="cosine", warmup=5,
                      kd=1.0, ce=0.0, T=1.0)}
NAIVE = {"naive_ref": ("ref", "kd"), "ce_ref": ("ref", "ce"), "naive_ours": ("ours", "kd"),
         "naive_depth": ("depth", "kd")}
CHOSEN = dict(RECIPE, mbs=2, gbs=2, axes="depth")
"""What the sweep chose (docs/RESULTS.md, "Distillation defaults") and the demo uses: 2 x 256 per
step and the student pruned to 15 of 30 layers; `axes=width` gives the hidden + ffn student."""
KNOBS = dict({"work": "/tmp/minitron_bench_smollm2", "tokens": 40960, "seeds": "1,2,3",
              "arms": "ours,manual,naive_ref,ce_ref,naive_ours", "split": "report",
              "windows": 10, "threads": 2, "score": "select,report",
              "starts": "true", "teacher": "smollm2"}, **CHOSEN)
GEMMA_WORK = "/tmp/minitron_bench_gemma3"


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def experiment_target(name: str) -> dict:
    """The prune.target sizes an experiment sets ({field: size})."""
    import dataclasses

    from megatron_minitron.config.loader import load_config

    target = load_config([f"experiment={name}"]).prune.target
    return {k: v for k, v in dataclasses.asdict(target).items() if v is not None}


def students(work: str, teacher_kind: str = "smollm2"):
    """(teacher ckpt, teacher HF dir, our pruned ckpt, our student HF dir, reference HF dir)."""
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.checkpoint.embedded import fetch

    from reference_prune import reference_prune

    w = Path(work)
    teacher = smollm2.teacher_checkpoint(work, teacher_kind)
    if teacher_kind == "smollm2":
        ours = smollm2.pruned_checkpoint(work, "activation")
    else:  # the experiment's target: hidden, ffn and query heads together
        ours = smollm2.pruned_checkpoint(work, "activation", teacher=teacher_kind,
                                         target=experiment_target(teacher_kind))
    ours_hf = _hf_export(ours, w / "hf_student_activation")
    teacher_hf = str(fetch(teacher_kind))
    model = read_header(ours).model
    src = read_header(teacher).model
    heads = model.num_attention_heads if model.num_attention_heads != src.num_attention_heads \
        else None
    ref_hf = w / (f"hf_reference_h{model.hidden_size}_f{model.ffn_hidden_size}" +
                  (f"_a{heads}" if heads else ""))
    if not (ref_hf / "config.json").exists():
        reference_prune(teacher_hf, str(ref_hf), model.hidden_size, model.ffn_hidden_size,
                        (b["tokens"] for b in _samples(teacher, smollm2.NUM_SAMPLES,
                                                       smollm2.SEED, 4)),
                        num_attention_heads=heads)
    return teacher, teacher_hf, ours, ours_hf, str(ref_hf)


def _samples(teacher_ckpt: str, num: int, seed: int, mbs: int, cfg=None):
    """Micro-batches of the first `num` demo train samples in the order `minitron distill`
    reads them with this seed (cfg: the run's config, whose plan sizes the dataset)."""
    from megatron_minitron.config.data import DataConfig
    from megatron_minitron.data.datasets import build_datasets, samples_per_split
    from megatron_minitron.eval.perplexity import checkpoint_tokenizer

    tok = checkpoint_tokenizer(teacher_ckpt)
    sizes = samples_per_split(cfg.train) if cfg is not None else (num, 0, 0)
    data = cfg.data if cfg is not None else DataConfig(seq_length=SEQ)
    train = build_datasets(data, tok, sizes, seed)[0]
    for i in range(0, num, mbs):
        rows = [train[j] for j in range(i, i + mbs)]
        yield {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("tokens",)}


def windows(tokenizer, work: str, count: int, split: str):
    """{text: [count, SEQ] token windows} from the first (select) or second (report) half. A
    tokenizer that starts its encodings with <bos> (Gemma's) gets <bos> + SEQ - 1 text tokens
    in every window; others (SmolLM2's) SEQ consecutive tokens."""
    out = {}
    bos = tokenizer.bos_token_id
    for name, text in heldout_texts.texts(work).items():
        ids = torch.tensor(tokenizer(text)["input_ids"])
        if bos is not None and ids.numel() and int(ids[0]) == bos:
            body = ids[1:]
            n = body.numel() // (SEQ - 1)
            wins = torch.cat([torch.full((n, 1), bos),
                              body[: n * (SEQ - 1)].view(n, SEQ - 1)], dim=1)
        else:
            n = ids.numel() // SEQ
            wins = ids[: n * SEQ].view(n, SEQ)
        half = wins[: n // 2] if split == "select" else wins[n // 2:]
        if len(half) < count:
            raise SystemExit(f"{name}: only {len(half)} windows in its {split} half")
        out[name] = half[:count]
    return out


def hf_losses(model_dir: str, wins) -> dict:
    """{text: mean next-token loss in nats} of a Hugging Face model folder in fp32."""
    from transformers import AutoModelForCausalLM

    return model_losses(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                        wins)


@torch.no_grad()
def model_losses(model, wins) -> dict:
    """{text: mean next-token loss in nats} of a loaded Hugging Face model, 4 windows a call."""
    model.eval()
    out = {}
    for name, w in wins.items():
        losses = [model(input_ids=w[i:i + 4], labels=w[i:i + 4]).loss.item()
                  for i in range(0, len(w), 4)]
        sizes = [len(w[i:i + 4]) for i in range(0, len(w), 4)]
        out[name] = sum(l * s for l, s in zip(losses, sizes)) / sum(sizes)
    return out


def _config(run_dir: Path, student: str, teacher: str, recipe: dict, tokens: int, seed: int):
    from megatron_minitron.config.loader import load_config

    steps = tokens // (recipe["gbs"] * SEQ)
    overrides = [f"run.dir={run_dir}", f"checkpoint.load={student}",
                 f"train.train_iters={steps}", f"train.micro_batch_size={recipe['mbs']}",
                 f"train.global_batch_size={recipe['gbs']}", f"data.seq_length={SEQ}",
                 f"train.optimizer.lr={recipe['lr']}",
                 f"train.optimizer.min_lr={recipe['lr'] * recipe['min_lr_ratio']}",
                 f"train.optimizer.lr_decay_style={recipe['decay']}",
                 f"train.optimizer.lr_warmup_iters={recipe['warmup']}",
                 f"distill.kd_weight={recipe['kd']}", f"distill.ce_weight={recipe['ce']}",
                 f"distill.temperature={recipe['T']}", f"distill.teacher_checkpoint={teacher}",
                 "train.eval_interval=0", "train.eval_iters=1", "runtime.precision=fp32",
                 f"runtime.seed={seed}", "runtime.transformer_impl=local",
                 "logger.backend=none", "logger.progress_bar=false", "checkpoint.keep_last=1"]
    return load_config(overrides)


def _spec(arm: str, recipe: dict, k: dict, seed: int) -> dict:
    spec = {"arm": arm, "tokens": k["tokens"], "seed": seed, "windows": k["windows"],
            "recipe": recipe if arm not in NAIVE else None}
    if k.get("teacher", "smollm2") != "smollm2":  # SmolLM2's runs keep the keys they had
        spec["teacher"] = k["teacher"]
    return spec


def run_path(arm: str, recipe: dict, k: dict, seed: int) -> Path:
    """Where run_arm caches this run's result."""
    spec = _spec(arm, recipe, k, seed)
    return Path(k["work"]) / "recipe_runs" / f"{arm}_{_key(spec)}_s{seed}.json"


def cached_run(arm: str, recipe: dict, k: dict, seed: int):
    """This run's cached result if it has every half k["score"] asks for, else None (a run
    trained before a half was scored is trained again)."""
    out = run_path(arm, recipe, k, seed)
    if not out.is_file():
        return None
    cached = json.loads(out.read_text())
    return cached if all(s in cached["losses"] for s in k["score"].split(",")) else None


def run_arm(arm: str, recipe: dict, k: dict, seed: int, fixtures, wins_all) -> dict:
    """One trained student's losses on both halves of every text (cached as JSON)."""
    teacher, teacher_hf, ours, ours_hf, ref_hf = fixtures
    spec = _spec(arm, recipe, k, seed)
    out = run_path(arm, recipe, k, seed)
    cached = cached_run(arm, recipe, k, seed)
    if cached is not None:
        return cached
    run_dir = Path(k["work"]) / "recipe_runs" / f"tmp_{out.stem}"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    if arm in NAIVE:
        model_dir = _naive(arm, k, seed, fixtures, run_dir)
    else:
        from megatron_minitron.checkpoint.hf import mcore_to_hf
        from megatron_minitron.training.lm import distill

        distill(_config(run_dir, student_for(recipe, k["work"], ours), teacher, recipe,
                        k["tokens"], seed))
        model_dir = str(run_dir / "hf")
        mcore_to_hf(str(run_dir / "checkpoints"), model_dir, dtype="float32")
    train_s = time.perf_counter() - start
    losses = {split: hf_losses(model_dir, w) for split, w in wins_all.items()
              if split in k["score"].split(",")}
    result = dict(spec, train_s=train_s, losses=losses)
    out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def student_for(recipe: dict, work: str, ours: str) -> str:
    """Our pruned student for this recipe: `ours` (hidden + ffn), or the same non-embedding
    budget over recipe["axes"]."""
    axes = recipe.get("axes")
    if axes is None:
        return ours
    if axes == "depth":
        # 15 layers hold half the layers' parameters and half a final norm more than half
        return smollm2.pruned_checkpoint(work, "activation", fraction=0.501,
                                         budget_axes=["num_layers"], depth_metric="cosine")
    return smollm2.pruned_checkpoint(work, "activation", budget_axes=axes.split(","))


def _naive(arm: str, k: dict, seed: int, fixtures, run_dir: Path) -> str:
    """(a)/(b)/(c): kd_vs_hf's naive loop, 4 x 256 per step, on the seed's sample order."""
    from kd_vs_hf import naive

    teacher, teacher_hf, ours, ours_hf, ref_hf = fixtures
    start_from, loss = NAIVE[arm]
    student_hf = depth_student_hf(k["work"], ours) if start_from == "depth" else \
        {"ref": ref_hf, "ours": ours_hf}[start_from]
    step = naive({"precision": "fp32"}, teacher_hf, student_hf, torch.device("cpu"),
                 loss_kind=loss, lr=3e-4)
    recipe = NAMED["manual"]  # 4 x 256 per step: the sample plan of the naive loop
    cfg = _config(run_dir, ours, teacher, recipe, k["tokens"], seed)
    torch.manual_seed(seed)
    for batch in _samples(teacher, k["tokens"] // SEQ, seed, 4, cfg):
        step(batch["tokens"])
    step.student.save_pretrained(str(run_dir / "hf"))
    return str(run_dir / "hf")


def depth_student_hf(work: str, ours: str) -> str:
    """The `ours` arm's default student (CHOSEN: depth), exported to Hugging Face once."""
    return _hf_export(student_for(CHOSEN, work, ours), Path(work) / "hf_student_depth")


def _hf_export(ckpt: str, folder: Path) -> str:
    from megatron_minitron.checkpoint.hf import mcore_to_hf

    if not (folder / "config.json").exists():
        mcore_to_hf(ckpt, str(folder), dtype="float32")
    return str(folder)


def _cached(path: Path, make):
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(make(), indent=1))
    return json.loads(path.read_text())


def summarize(results, texts, split):
    """{arm: {text: (mean ppl, min, max)}} over seeds."""
    out = {}
    for arm, runs in results.items():
        out[arm] = {}
        for t in texts:
            p = [math.exp(r["losses"][split][t]) for r in runs]
            out[arm][t] = (sum(p) / len(p), min(p), max(p))
    return out


def verdict(ours, other) -> str:
    spread = max(ours[2] - ours[1], other[2] - other[1])
    gap = other[0] - ours[0]
    if gap > spread:
        return "beats {} by more than the spread"
    return "worse than {}" if -gap > spread else "within noise of {}"


def main(argv):
    k = parse_knobs(argv, KNOBS)
    if k["teacher"] not in ("smollm2", "gemma3_270m"):
        raise SystemExit(f"teacher={k['teacher']}: use smollm2 or gemma3_270m")
    if k["teacher"] != "smollm2" and k["work"] == KNOBS["work"]:
        k["work"] = GEMMA_WORK
    torch.set_num_threads(k["threads"])
    from megatron_minitron.eval.perplexity import checkpoint_tokenizer  # noqa: F401
    from transformers import AutoTokenizer

    from kd_vs_hf import cpu_description

    fixtures = students(k["work"], k["teacher"])
    tok = AutoTokenizer.from_pretrained(fixtures[1])
    wins_all = {s: windows(tok, k["work"], k["windows"], s) for s in ("select", "report")}
    texts = list(wins_all["select"])
    recipe = {name: k[name] for name in RECIPE}
    # the hidden + ffn student's runs keep the keys they had; Gemma's student is its target
    if k["axes"] != "width" and k["teacher"] == "smollm2":
        recipe["axes"] = k["axes"]
    seeds = [int(s) for s in k["seeds"].split(",")]
    arms = k["arms"].split(",")
    results = {}
    for seed in seeds:  # seeds outermost: a partial sweep still covers every arm
        for arm in arms:
            r = run_arm(arm, NAMED.get(arm, recipe), k, seed, fixtures, wins_all)
            results.setdefault(arm, []).append(r)
            print(f"[{arm} seed {seed}: {r['train_s']:.0f} s, " + ", ".join(
                f"{t} {math.exp(r['losses'][k['split']][t]):.1f}" for t in texts) + "]",
                flush=True)
    start = {"teacher": fixtures[1], "pruned ours": fixtures[3], "pruned ref": fixtures[4]}
    if "naive_depth" in arms or recipe.get("axes") == "depth":
        start["pruned depth"] = depth_student_hf(k["work"], fixtures[2])
    if k["starts"] != "true":  # starts=false: no rows for the teacher and the pruned students
        start = {}
    base = {name: _cached(Path(k["work"]) / "recipe_runs" / f"start_{name.replace(' ', '_')}_"
                          f"{k['windows']}_{k['split']}.json",
                          lambda d=d: hf_losses(d, wins_all[k["split"]]))
            for name, d in start.items()}
    summary = summarize(results, texts, k["split"])
    print(f"\nCPU: {cpu_description()}")
    print(f"teacher {k['teacher']}; {k['tokens']:,} demo-corpus tokens per arm, seeds {seeds}, "
          f"ours = {recipe}; "
          f"perplexity (HF fp32) on {k['windows']} x {SEQ} tokens of the {k['split']} half of "
          f"each text; mean [min-max] over seeds")
    print(f"{'arm':<12}" + "".join(f"{t:>24}" for t in texts) + f"{'train s':>9}")
    for name, losses in base.items():
        print(f"{name:<12}" + "".join(f"{math.exp(losses[t]):>24.2f}" for t in texts))
    for arm, rows in summary.items():
        secs = sum(r["train_s"] for r in results[arm]) / len(results[arm])
        print(f"{arm:<12}" + "".join(f"{m:>10.2f} [{lo:.2f}-{hi:.2f}]".rjust(24)
                                     for m, lo, hi in rows.values()) + f"{secs:>9.0f}")
    if "ours" in summary:
        for arm in summary:
            if arm == "ours":
                continue
            for t in texts:
                gain = 1 - summary["ours"][t][0] / summary[arm][t][0]
                mine = {r["seed"]: r["losses"][k["split"]][t] for r in results["ours"]}
                pairs = [mine[r["seed"]] < r["losses"][k["split"]][t] for r in results[arm]
                         if r["seed"] in mine]
                print(f"{t}: ours {verdict(summary['ours'][t], summary[arm][t]).format(arm)}"
                      f" ({-gain:+.1%} perplexity vs {arm}; lower on {sum(pairs)} of "
                      f"{len(pairs)} same-seed pairs)")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
