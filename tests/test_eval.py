"""Evaluation: held-out perplexity, the lm-eval adapter, `minitron eval` and the run report.

A tiny random model (saved once as a checkpoint) is scored by our code and by a plain torch
forward of the same GPTModel (`direct_*`): one single-process run (`single_run`) and one
two-process run over TP=2, PP=2 and DP=2 (`layout_run`), both spawned (tests/distributed.py).
"""

import functools
import importlib.util
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distributed import run_distributed
from megatron_minitron.config.errors import ConfigError

MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4,
             num_query_groups=2, kv_channels=16, vocab_size=257, init_method_std=0.1)
SEQ, MBS = 32, 2
TEXT = ("Full fathom five thy father lies;\nOf his bones are coral made;\nThose are pearls "
        "that were his eyes:\nNothing of him that doth fade,\nBut doth suffer a sea-change\n")
REQUESTS = [("Full fathom five", " thy father"), ("Of his bones", " are coral made;"),
            ("", "Nothing of him")]
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed "
                                   "(pip install -e '.[eval]')")


def _init(tp=1, pp=1):
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.runtime.distributed import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
    return initialize(parallel, runtime), parallel, runtime


def _chunks(root, tp=1, pp=1):
    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.models.builder import build_model

    ctx, parallel, runtime = _init(tp, pp)
    chunks = build_model(read_header(f"{root}/ckpt").model, parallel, runtime, ctx.device)
    load(f"{root}/ckpt", chunks, ctx=ctx)
    return ctx, chunks, runtime


def _lm(chunks, ctx):
    from megatron_minitron.data.tokenizer import ByteTokenizer
    from megatron_minitron.eval.lm_eval_adapter import MinitronLM

    return MinitronLM(chunks, ByteTokenizer(), ctx, MODEL["vocab_size"], SEQ, MBS, 6)


def _requests(pairs):
    return [SimpleNamespace(args=p) for p in pairs]


def _log_probs(gpt, ids):
    """Plain forward of one sequence: log-softmax [n, padded_vocab] and real-vocab argmax."""
    with torch.no_grad():
        logits = gpt(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0].double()
    return logits.log_softmax(-1), logits[:, :MODEL["vocab_size"]].argmax(-1)


def direct_loss(gpt, ids):
    """Mean next-token cross-entropy in SEQ-token windows, one window at a time."""
    total, count = 0.0, 0
    for i in range(0, len(ids) - 1, SEQ):
        inp, tgt = ids[i:i + SEQ], torch.tensor(ids[i + 1:i + SEQ + 1])
        lp, _ = _log_probs(gpt, inp)
        total -= float(lp[torch.arange(len(tgt)), tgt].sum())
        count += len(tgt)
    return total / count, count


def direct_loglikelihood(gpt, tok, context, continuation):
    ctx_ids = tok.encode(context) if context else [tok.eod]
    cont = tok.encode(continuation)
    lp, arg = _log_probs(gpt, ctx_ids + cont[:-1])
    n = len(cont)
    tgt = torch.tensor(cont)
    return float(lp[-n:][torch.arange(n), tgt].sum()), bool(torch.equal(arg[-n:], tgt))


def direct_greedy(gpt, tok, context, steps):
    """The greedy continuation's ids (they need not decode to valid UTF-8)."""
    ids = [tok.eod] + tok.encode(context)
    for _ in range(steps):
        ids.append(int(_log_probs(gpt, ids)[1][-1]))
    return ids[len(ids) - steps:]


def _single(root: str):
    from megatron_minitron.checkpoint.dist import CheckpointHeader, save
    from megatron_minitron.config.model import ModelConfig
    from megatron_minitron.data.corpus import demo_heldout_text
    from megatron_minitron.data.tokenizer import ByteTokenizer
    from megatron_minitron.eval.perplexity import (checkpoint_tokenizer, evaluate_checkpoint,
                                                   heldout_batches)
    from megatron_minitron.models.builder import build_model, unwrap
    from megatron_minitron.runtime.distributed import teardown

    ctx, parallel, runtime = _init()
    m, tok = ModelConfig(**MODEL), ByteTokenizer()
    chunks = build_model(m, parallel, runtime, ctx.device)
    save(f"{root}/ckpt", 0, chunks, CheckpointHeader(model=m, tokenizer=tok.describe()), ctx=ctx)
    gpt = unwrap(chunks[0]).eval()
    out = {"result": evaluate_checkpoint(f"{root}/ckpt", heldout_batches(
        checkpoint_tokenizer(f"{root}/ckpt"), TEXT, SEQ, MBS), ctx, runtime),
        "direct": direct_loss(gpt, tok.encode(TEXT))}
    if HAS_LM_EVAL:
        from megatron_minitron.eval.lm_eval_adapter import run_tasks

        lm = _lm(chunks, ctx)
        out["ll"] = lm.loglikelihood(_requests(REQUESTS))
        out["ll_direct"] = [direct_loglikelihood(gpt, tok, c, x) for c, x in REQUESTS]
        context = [tok.eod] + tok.encode("Those are")
        out["ll_greedy"] = lm._loglikelihood_tokens([
            (("", ""), context, direct_greedy(gpt, tok, "Those are", 3))])[0]
        out["rolling"] = lm.loglikelihood_rolling(_requests([(TEXT[:30],)]))
        out["rolling_direct"] = direct_loglikelihood(gpt, tok, "", TEXT[:30])[0]
        out["gen"] = lm.generate_until(_requests([("Those are", {"until": ["\n"],
                                                                 "max_gen_toks": 5})]))
        ids = direct_greedy(gpt, tok, "Those are", 5)
        ids = ids[:ids.index(tok.eod)] if tok.eod in ids else ids
        out["gen_direct"] = tok.decode(ids).split("\n")[0]
        out["tasks"] = run_tasks(lm, ["minitron_demo"], limit=3)
    heldout = demo_heldout_text(500)
    out["heldout_direct"] = direct_loss(gpt, tok.encode(heldout))
    teardown()
    from megatron_minitron.cli.eval import main

    main([f"eval.checkpoint={root}/ckpt", f"run.dir={root}/run", f"data.seq_length={SEQ}",
          "eval.num_samples=4", f"eval.micro_batch_size={MBS}", "eval.heldout_chars=500",
          "eval.splits=[valid]", "runtime.device=cpu", "runtime.transformer_impl=local",
          "runtime.precision=fp32"])
    return out


@functools.lru_cache(maxsize=None)
def single_run():
    root = tempfile.mkdtemp(prefix="minitron_eval_")
    return root, run_distributed(_single, 1, root)[0]


def _layouts(root: str):
    from megatron.core import parallel_state as ps

    from megatron_minitron.data.tokenizer import ByteTokenizer
    from megatron_minitron.eval.perplexity import evaluate, heldout_batches

    out = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        ctx, chunks, _ = _chunks(root, tp, pp)
        batches = heldout_batches(ByteTokenizer(), TEXT, SEQ, MBS, None, ctx.dp_rank, ctx.dp_size)
        out[name] = {"result": evaluate(chunks, batches, ctx)}
        if HAS_LM_EVAL:
            out[name]["ll"] = _lm(chunks, ctx).loglikelihood(_requests(REQUESTS))
        ps.destroy_model_parallel()
    return out


@functools.lru_cache(maxsize=None)
def layout_run():
    root, _ = single_run()
    return run_distributed(_layouts, 2, root)


# ---- batches and config (no model) --------------------------------------------------------

def test_heldout_windows_predict_every_token_once_and_split_over_dp():
    from megatron_minitron.data.tokenizer import ByteTokenizer
    from megatron_minitron.eval.perplexity import heldout_batches

    tok, ids = ByteTokenizer(), ByteTokenizer().encode(TEXT)
    one = heldout_batches(tok, TEXT, SEQ, MBS)
    predicted = [int(t) for b in one for row, m in zip(b["labels"], b["loss_mask"])
                 for t, keep in zip(row, m) if keep]
    assert predicted == ids[1:]
    assert all(b["tokens"].shape == (MBS, SEQ) for b in one)
    shares = [heldout_batches(tok, TEXT, SEQ, MBS, None, r, 2) for r in range(2)]
    assert len(shares[0]) == len(shares[1])  # equal micro-batch counts for the pipeline
    assert sum(float(b["loss_mask"].sum()) for s in shares for b in s) == len(ids) - 1
    capped = heldout_batches(tok, TEXT, SEQ, MBS, num_samples=1)
    assert sum(float(b["loss_mask"].sum()) for b in capped) == SEQ
    with pytest.raises(ConfigError, match="eval.heldout_chars"):
        heldout_batches(tok, "x", SEQ, MBS)


def test_same_samples_ignores_micro_batching_only():
    """What lets the pipeline's eval stage score a validation set once for both files."""
    from megatron_minitron.data.tokenizer import ByteTokenizer
    from megatron_minitron.eval.perplexity import heldout_batches
    from megatron_minitron.eval.suite import same_samples

    tok = ByteTokenizer()
    a = heldout_batches(tok, TEXT, SEQ, 2, num_samples=4)
    assert same_samples(a, heldout_batches(tok, TEXT, SEQ, 4, num_samples=4))
    assert not same_samples(a, heldout_batches(tok, TEXT, SEQ, 2, num_samples=2))
    assert not same_samples(a, heldout_batches(tok, TEXT[1:], SEQ, 2, num_samples=4))
    assert not same_samples(a, [])


def test_score_cache_ignores_damaged_or_foreign_entries(tmp_path):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.eval import score_cache

    cfg = load_config([f"data.cache_dir={tmp_path}"])
    path = score_cache.entry_path(cfg, "k1")
    assert score_cache.read(cfg, "k1") is None and score_cache.read(cfg, None) is None
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert score_cache.read(cfg, "k1") is None
    score_cache.write(cfg, "k1", "/ckpt", {"models": {"loss": 1.5}})
    assert score_cache.read(cfg, "k1") == {"models": {"loss": 1.5}}
    score_cache.entry_path(cfg, "k2").write_text(path.read_text())  # another key's entry
    assert score_cache.read(cfg, "k2") is None
    assert not list(path.parent.glob("*.tmp*"))


def test_eval_config_composes_and_names_bad_fields():
    from megatron_minitron.config.loader import load_config

    cfg = load_config(["eval.tasks=[minitron_demo]", "eval.splits=[test]", "eval.limit=5"])
    assert cfg.eval.tasks == ["minitron_demo"] and cfg.eval.splits == ["test"]
    for bad, field in (("eval.splits=[dev]", "eval.splits"), ("eval.num_samples=0",
                                                              "eval.num_samples"),
                       ("eval.limit=0", "eval.limit")):
        with pytest.raises(ConfigError) as e:
            load_config([bad])
        assert e.value.field == field


# ---- perplexity ---------------------------------------------------------------------------

def test_perplexity_is_exp_loss_and_matches_a_plain_forward():
    _, out = single_run()
    r, (loss, tokens) = out["result"], out["direct"]
    assert r.tokens == tokens == len(TEXT) - 1
    assert r.loss == pytest.approx(loss, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(r.loss), rel=1e-12)
    assert 2.0 < r.loss < 10.0


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_perplexity_is_the_same_under_tp_pp_dp(layout):
    _, single = single_run()
    r = layout_run()[0][layout]["result"]
    assert r.tokens == single["result"].tokens
    assert r.loss == pytest.approx(single["result"].loss, rel=1e-5)


def test_minitron_eval_writes_eval_json():
    root, out = single_run()
    data = json.loads((Path(root) / "run" / "eval" / "eval.json").read_text())
    assert set(data["perplexity"]) == {"valid", "heldout"}
    assert data["perplexity"]["valid"]["tokens"] == 4 * SEQ
    loss, tokens = out["heldout_direct"]
    assert data["perplexity"]["heldout"]["tokens"] == tokens
    assert data["perplexity"]["heldout"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert data["params"] > data["params_non_embedding"] > 0
    assert "tasks" not in data


# ---- lm-eval adapter ----------------------------------------------------------------------

@needs_lm_eval
def test_loglikelihood_matches_a_plain_forward():
    _, out = single_run()
    for (lp, greedy), (lp_ref, greedy_ref) in zip(out["ll"], out["ll_direct"]):
        assert lp == pytest.approx(lp_ref, rel=1e-6) and lp < 0
        assert greedy == greedy_ref
    assert out["ll_greedy"][1] is True  # the model's own greedy continuation
    assert not any(g for _, g in out["ll"])  # text an untrained model would not produce
    assert out["rolling"][0] == pytest.approx(out["rolling_direct"], rel=1e-6)


@needs_lm_eval
def test_generate_until_is_greedy_and_stops():
    _, out = single_run()
    assert out["gen"] == [out["gen_direct"]]
    assert "\n" not in out["gen"][0]


@needs_lm_eval
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_loglikelihood_is_the_same_under_tp_pp_dp(layout):
    _, single = single_run()
    got = layout_run()[0][layout]["ll"]
    ref = single["ll"]
    assert [g for _, g in got] == [g for _, g in ref]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in ref], rel=1e-5)


@needs_lm_eval
def test_local_demo_tasks_run_through_lm_eval():
    _, out = single_run()
    tasks = out["tasks"]
    assert set(tasks) == {"minitron_next_line", "minitron_cloze", "minitron_tempest"}
    assert all(t["sample_len"] == 3 for t in tasks.values())
    assert 0.0 <= tasks["minitron_next_line"]["acc,none"] <= 1.0
    assert 0.0 <= tasks["minitron_cloze"]["exact_match,none"] <= 1.0
    # an untrained model is near-uniform over the padded vocabulary (384 ids)
    assert 100 < tasks["minitron_tempest"]["byte_perplexity,none"] < 1000


def test_demo_tasks_are_deterministic_and_well_formed():
    from megatron_minitron.eval.tasks import demo

    lines = [f"Speak line {i} softly to the gentle sea" for i in range(60)]
    text = "\n".join(lines)
    items = demo.next_line_items(text, 10)
    assert items == demo.next_line_items(text, 10) and len(items) == 10
    for item in items:
        assert len(set(item["choices"])) == 4
        last_context_line = item["context"].rstrip("\n").split("\n")[-1]
        assert item["choices"][item["label"]] == lines[lines.index(last_context_line) + 1]
    assert len({item["label"] for item in items}) > 1  # the answer's slot varies
    cloze = demo.cloze_items(text, 5)
    assert len(cloze) == 5
    assert all(c["target"] == "sea" and c["context"].endswith(" the gentle ") for c in cloze)
    assert demo.passage_items("\n\n".join(["word " * 50] * 3), 2) == [{"text": "word " * 49
                                                                        + "word"}] * 2


# ---- report -------------------------------------------------------------------------------

def _fake_run(run: Path):
    from megatron_minitron.importance.scores import Scores, ScoresHeader, save_scores

    for stage, names in (("distill", ["kd_loss", "lm_loss"]), ("train", ["lm_loss"])):
        (run / stage).mkdir(parents=True)
        recs = [{"step": s, **{n: 5.0 / s for n in names}} for s in range(1, 6)]
        recs.append({"step": 5, **{f"valid_{n}": 1.2 for n in names}})
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tensors = {"mlp.neurons": torch.rand(4, 192), "attention.heads": torch.rand(4, 4),
               "layers.loss": torch.rand(4), "blocks.loss.k2": torch.rand(3),
               "embedding.channels": torch.rand(64)}
    (run / "importance").mkdir()
    save_scores(str(run / "importance" / "scores.safetensors"), Scores(tensors, ScoresHeader(
        model_config_hash="x", model={}, num_samples=8, seq_aggregation="mean",
        sample_aggregation="mean")))
    (run / "search").mkdir()
    (run / "search" / "ranking.json").write_text(json.dumps([
        {"name": "cand_b", "params": 900, "val_loss": 3.5},
        {"name": "cand_a", "params": 1000, "val_loss": 3.1, "chosen": True, "tokens": 4096}]))
    (run / "summary.json").write_text(json.dumps({"rows": [
        {"name": "teacher", "params": 2000, "loss": 2.5, "perplexity": 12.18, "tokens": 0,
         "path": "teacher"},
        {"name": "distilled", "params": 1000, "loss": 2.9, "perplexity": 18.17,
         "tokens": 65536, "path": "distill/checkpoints"}]}))


def test_report_has_every_section_and_its_plots(tmp_path):
    from megatron_minitron.eval.report import write_report

    _fake_run(tmp_path)
    report = write_report(str(tmp_path)).read_text()
    for heading in ("## Summary", "## Loss curves", "### distill", "### train",
                    "## Importance", "## Search ranking", "## Parameters vs loss"):
        assert heading in report
    assert "| distilled | 1,000 | 2.9 | 18.17 | 65,536 | distill/checkpoints |" in report
    # the ranking table is sorted best first
    assert report.index("| cand_a |") < report.index("| cand_b |")
    pngs = [line.split("(")[1].rstrip(")") for line in report.splitlines()
            if line.startswith("![")]
    assert len(pngs) == 6
    for png in pngs:
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_sets_the_teacher_beside_the_students(tmp_path):
    from megatron_minitron.eval.report import write_report

    _fake_run(tmp_path)
    suite = {"params": 2000, "perplexity": {"heldout": {"perplexity": 12.5}},
             "tasks": {"minitron_next_line": {"acc,none": 0.5, "acc_stderr,none": "N/A",
                                              "sample_len": 10}}}
    student = {"params": 1000, "perplexity": {"heldout": {"perplexity": 20.25}},
               "tasks": {"minitron_next_line": {"acc,none": 0.25, "sample_len": 10}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_models.json").write_text(json.dumps(
        {"models": {"teacher": suite, "distilled": student}}))
    report = write_report(str(tmp_path)).read_text()
    section = report.split("## Teacher and students on the same sets and tasks")[1]
    assert "| set | teacher | distilled |" in section
    assert "| training tokens | 0 | 65,536 |" in section
    assert "| heldout perplexity | 12.5 | 20.25 |" in section
    assert "| minitron_next_line acc,none | 0.5 | 0.25 |" in section
    assert "stderr" not in section and "sample_len" not in section


def test_report_skips_what_is_absent(tmp_path):
    from megatron_minitron.eval.report import write_report

    assert "Nothing to report yet" in write_report(str(tmp_path)).read_text()
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "ranking.json").write_text(json.dumps(
        {"rows": [{"name": "only", "params": 10, "val_loss": 1.0}]}))
    report = write_report(str(tmp_path)).read_text()
    assert "## Search ranking" in report and "## Summary" not in report
    assert "## Teacher and students" not in report
    assert "## Loss curves" not in report and "## Importance" not in report
