"""Qwen3 and Phi-3 beside Llama/Mistral/Qwen2: bit-exact HF round trips, logit parity with
transformers at TP=1, TP=2 and PP=2, importance -> prune -> distill -> export for each family.
Random models, odd shapes, no hub (Gemma: tests/test_hf_gemma.py)."""

import json
from pathlib import Path

import pytest
from hf_fixtures import assert_same_weights, convert_all, random_hf_model
import torch

from distributed import next_port, run_distributed
from megatron_minitron.checkpoint import hf_keymap as keymap
from megatron_minitron.checkpoint.hf import mcore_to_hf
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from test_hf_interop import (ARCH_FIELDS, SEQ, TINY, VOCAB, _megatron_logits, _rel,
                              _write_tokenizer, tp1_logits)
from precision import FP32

FAMILIES = {
    # q/k norm, tied embeddings, head_dim 24 != 56/4
    "qwen3_tied": ("qwen3", dict(TINY, hidden_size=56, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    # q/k norm, untied, 3 heads per group, head_dim 20 != 48/6
    "qwen3_untied": ("qwen3", dict(TINY, hidden_size=48, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=20,
                                   tie_word_embeddings=False)),
    # fused qkv_proj / gate_up_proj, head_dim 24 != 60/4, a sliding window the import caps
    # max_position_embeddings at (and export gives back)
    "phi3": ("phi3", dict(TINY, hidden_size=60, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=24, sliding_window=100, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)),
}
PRUNE = {  # heads / groups / ffn / hidden each shrink
    "qwen3_tied": dict(num_attention_heads=2, ffn_hidden_size=64, hidden_size=40),
    "qwen3_untied": dict(num_query_groups=1, num_attention_heads=2, ffn_hidden_size=48,
                         hidden_size=32),
    "phi3": dict(num_attention_heads=2, ffn_hidden_size=40, hidden_size=44),
}
PUBLISHED = {  # config.json fields of the released models (Qwen3-8B's model card: 36 layers,
    # 32 / 8 heads, 8.2B parameters, 6.95B without embeddings; Phi-3-mini: 3.8B)
    "qwen3_8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                     use_sliding_window=False),
    "phi3_mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072,
                      intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False),
}
EXPERIMENTS = {"qwen3_8b_to_6b": ("qwen3_8b", 5.98e9), "phi3_mini_to_3b": ("phi3_mini", 2.93e9)}


def _make_hf(name: str, folder: Path):
    model_type, fields = FAMILIES[name]
    model = random_hf_model(model_type, fields, sorted(FAMILIES).index(name) + 10, folder)
    _write_tokenizer(folder, 250)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))  # data's eod
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF folder, our checkpoint, input ids, HF fp32 logits)."""
    return convert_all(tmp_path_factory.mktemp("hf_families"), FAMILIES, _make_hf, VOCAB, SEQ, 1)


def test_phi3_fused_qkv_and_gate_up_layout():
    cfg = ModelConfig(hidden_size=8, num_attention_heads=6, num_query_groups=3, kv_channels=2,
                      num_layers=1, ffn_hidden_size=4, vocab_size=5)
    maps = {t.kind: t for t in keymap.tensor_maps(cfg, "phi3")}
    qkv, fc1 = maps["qkv"], maps["fc1"]
    assert qkv.hf == ("model.layers.0.self_attn.qkv_proj.weight",)
    (shape,) = keymap.hf_shapes(qkv, cfg)
    fused = torch.randn(shape)  # [q (12 rows); k (6); v (6)]
    q, k, v = fused[:12], fused[12:18], fused[18:]
    mc = keymap.to_mcore(qkv, [fused], cfg)
    # megatron's group 1: q heads 2,3, then k head 1, then v head 1
    assert torch.equal(mc[8:12], q[4:8]) and torch.equal(mc[12:14], k[2:4])
    assert torch.equal(mc[14:16], v[2:4])
    assert torch.equal(keymap.to_hf(qkv, mc, cfg)[0], fused)
    # Phi3MLP chunks gate_up_proj into (gate, up): megatron's [gate; up] as it is
    assert keymap.hf_shapes(fc1, cfg) == [(8, 8)]
    gate_up = torch.randn(8, 8)
    assert torch.equal(keymap.to_mcore(fc1, [gate_up], cfg), gate_up)
    assert torch.equal(keymap.to_hf(fc1, gate_up, cfg)[0], gate_up)


def test_qwen3_config_and_export_rules():
    cfg = keymap.model_config_from_hf(dict(FAMILIES["qwen3_tied"][1], model_type="qwen3"))
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and cfg.kv_channels == 24
    assert keymap.default_model_type(cfg) == "qwen3"
    assert "qwen3" in keymap.hf_export_problem(cfg, "llama")
    assert "q/k RMSNorm" in keymap.hf_export_problem(ModelConfig(), "qwen3")
    with pytest.raises(ConfigError, match="attention_bias"):
        keymap.model_config_from_hf(dict(FAMILIES["qwen3_tied"][1], model_type="qwen3",
                                         attention_bias=True))
    with pytest.raises(ConfigError, match="partial RoPE") as e:
        keymap.model_config_from_hf(dict(FAMILIES["phi3"][1], model_type="phi3",
                                         partial_rotary_factor=0.5))
    assert e.value.field.endswith(":partial_rotary_factor")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_bit_exact(converted, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_minitron.checkpoint.dist import read_header

    hf_dir, ckpt, _, _ = converted[name]
    out = mcore_to_hf(str(ckpt), str(tmp_path / "hf"), dtype="float32")
    assert_same_weights(hf_dir, out)
    c0, c1 = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    assert {k: c0.get(k) for k in ARCH_FIELDS} == {k: c1.get(k) for k in ARCH_FIELDS}
    assert c0.get("sliding_window") == c1.get("sliding_window")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == c0["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    cfg = read_header(str(ckpt)).model  # our count, q/k norms included, less the padded rows
    pad = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters() - pad * (
        1 if cfg.share_embeddings_and_output_weights else 2)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parity_tp1(converted, name):
    _, ckpt, ids, hf_logits = converted[name]
    logits = tp1_logits(ckpt, ids)
    print(f"\n{name} TP=1 logits rel diff {_rel(logits, hf_logits):.2e}")
    assert logits.shape == hf_logits.shape and _rel(logits, hf_logits) < 1e-4


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parity_tp2_pp2(converted, tp, pp):
    """Every family's TP=1 checkpoint loads resharded in one set of processes per layout."""
    names = list(FAMILIES)
    per_rank = run_distributed(_megatron_logits, 2, tp, pp, [converted[n][1] for n in names],
                               converted[names[0]][2])
    for i, name in enumerate(names):
        logits, hf_logits = per_rank[-1][i], converted[name][3]
        print(f"\n{name} TP={tp} PP={pp} logits rel diff {_rel(logits, hf_logits):.2e}")
        assert _rel(logits, hf_logits) < 1e-4, name
        if tp > 1:
            assert torch.equal(per_rank[0][i], logits), name


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_shipped_configs_are_what_import_makes_and_prune_to_their_size(experiment):
    import dataclasses

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.pruning.plan import resolve_target

    model, params = EXPERIMENTS[experiment]
    cfg = load_config([f"experiment={experiment}"])
    assert cfg.model == keymap.model_config_from_hf(PUBLISHED[model])
    src = keymap.model_config_from_hf(PUBLISHED[model])
    assert src.num_parameters() == pytest.approx(
        {"qwen3_8b": 8.19e9, "phi3_mini": 3.82e9}[model], rel=1e-3)
    target = resolve_target(src, cfg.prune)
    assert target.num_parameters() == pytest.approx(params, rel=1e-3)
    assert dataclasses.replace(target, hidden_size=src.hidden_size,
                               ffn_hidden_size=src.ffn_hidden_size) == src
    assert keymap.hf_export_problem(target, PUBLISHED[model]["model_type"]) is None


# ---- importance -> prune -> distill -> export, per family ---------------------------------

def compress(root: str, jobs):
    """Spawned, one process: for each (name, checkpoint, prune target sizes, input ids):
    activation importance on the demo corpus, prune to the sizes (depth by the block scores
    where num_layers shrinks), two distillation steps from the unpruned teacher,
    HF export of the pruned and the distilled model, and our TP=1 logits of both."""
    from megatron_minitron.cli import distill, importance, prune
    from megatron_minitron.runtime.distributed import teardown

    out = {}
    common = [f"data.cache_dir={root}/cache", "data.seq_length=16", "logger.backend=none",
              "logger.progress_bar=false", FP32]
    for name, ckpt, sizes, ids in jobs:
        d = f"{root}/{name}"
        next_port()
        importance.main(common + [f"run.dir={d}", f"checkpoint.load={ckpt}",
                                  "importance.num_samples=4", "importance.micro_batch_size=2",
                                  f"importance.output={d}/scores.safetensors"])
        next_port()
        prune.main(common + [f"run.dir={d}", f"checkpoint.load={ckpt}",
                             f"prune.scores={d}/scores.safetensors", f"prune.output={d}/pruned"]
                   + [f"prune.target.{k}={v}" for k, v in sizes.items()])
        next_port()
        distill.main(common + [f"run.dir={d}/kd", f"checkpoint.load={d}/pruned",
                               f"distill.teacher_checkpoint={ckpt}", "train.train_iters=2",
                               "train.micro_batch_size=2", "train.global_batch_size=2",
                               "train.eval_interval=0", "train.optimizer.lr_warmup_iters=0"])
        pruned_hf = mcore_to_hf(f"{d}/pruned", f"{d}/pruned_hf", dtype="float32")
        # no model_type: the pruned and the distilled headers carry the imported HF family
        kd_hf = mcore_to_hf(f"{d}/kd/checkpoints", f"{d}/kd_hf", dtype="float32")
        try:
            logits = _megatron_logits(1, 1, [f"{d}/pruned", f"{d}/kd/checkpoints"], ids)
        finally:
            teardown()
        out[name] = (str(pruned_hf), str(kd_hf), logits)
    return out


def test_each_family_prunes_distills_and_exports(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    jobs = [(n, str(converted[n][1]), PRUNE[n], converted[n][2]) for n in FAMILIES]
    (results,) = run_distributed(compress, 1, str(tmp_path), jobs)
    for name, (pruned_hf, kd_hf, ours) in results.items():
        model_type, src = FAMILIES[name]
        want = dict(src, **PRUNE[name])
        ng = want.get("num_query_groups", src["num_key_value_heads"])
        ids = converted[name][2]
        for folder, logits in zip((pruned_hf, kd_hf), ours):
            cfg = json.loads((Path(folder) / "config.json").read_text())
            assert cfg["model_type"] == model_type, folder
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            sd = model.state_dict()
            h, hn = want["hidden_size"], src["head_dim"]
            nq, f = want["num_attention_heads"], want["ffn_hidden_size"]
            att = "model.layers.0.self_attn."
            if model_type == "phi3":  # fused projections sliced by head and by neuron
                assert sd[att + "qkv_proj.weight"].shape == ((nq + 2 * ng) * hn, h)
                assert sd["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * f, h)
            else:  # q/k norms: one [head_dim] weight whichever heads survive
                assert sd[att + "q_proj.weight"].shape == (nq * hn, h)
                assert sd[att + "k_proj.weight"].shape == (ng * hn, h)
                assert sd[att + "q_norm.weight"].shape == sd[att + "k_norm.weight"].shape == (hn,)
                assert sd["model.layers.0.mlp.up_proj.weight"].shape == (f, h)
            assert sd[att + "o_proj.weight"].shape == (h, nq * hn)
            assert sd["model.embed_tokens.weight"].shape == (VOCAB, h)
            with torch.no_grad():
                hf_logits = model(ids).logits
            print(f"\n{name} {Path(folder).name} logits rel diff {_rel(logits, hf_logits):.2e}")
            assert _rel(logits, hf_logits) < 1e-4, folder
