"""Gemma 1, 2 and 3 (text) through `minitron convert`: bit-exact HF round trips, logits within
1e-4 of transformers' at TP=1, TP=2 and PP=2 on random models of odd shapes (sliding windows
shorter than the sequence, soft-capping that bites, two RoPE bases, head_dim != hidden /
heads), and importance -> prune (hidden, heads, ffn, depth) -> distill -> export, whose HF
export transformers loads with the logits we compute. Random models, no hub."""

import json
from pathlib import Path

import pytest
import torch
from hf_fixtures import assert_same_weights, convert_all, random_hf_model

from cli_process import minitron
from distributed import run_distributed
from megatron_minitron.checkpoint import hf_keymap as keymap
from megatron_minitron.checkpoint.hf import mcore_to_hf
from megatron_minitron.config.errors import ConfigError
from test_hf_families import compress
from test_hf_interop import (ARCH_FIELDS, SEQ, TINY, VOCAB, _megatron_logits, _rel,
                              _write_tokenizer, tp1_logits)

WINDOW = 5  # < SEQ: the sliding layers see fewer tokens than the global ones
FAMILIES = {
    # GeGLU (tanh gelu), zero-centred norms, sqrt(hidden) embedding scale, tied, MQA-ish
    # 2 groups, head_dim 20 != 56/4
    "gemma": ("gemma", dict(TINY, hidden_size=56, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=20, hidden_act="gelu_pytorch_tanh")),
    # post-sublayer norms, sliding / global alternation, soft-capping small enough to bite,
    # query_pre_attn_scalar != head_dim
    "gemma2": ("gemma2", dict(TINY, hidden_size=48, num_attention_heads=6,
                              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                              sliding_window=WINDOW, attn_logit_softcapping=0.5,
                              final_logit_softcapping=3.0)),
    # q/k norms, two RoPE bases, an irregular layer pattern, untied, head_dim 24 != 60/4
    "gemma3_text": ("gemma3_text", dict(
        TINY, hidden_size=60, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        query_pre_attn_scalar=24, sliding_window=WINDOW, tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
}
PRUNE = {  # hidden, heads or groups, ffn and one layer each
    "gemma": dict(num_attention_heads=2, ffn_hidden_size=64, hidden_size=40, num_layers=3),
    "gemma2": dict(num_attention_heads=3, num_query_groups=1, ffn_hidden_size=48,
                   hidden_size=36, num_layers=3),
    "gemma3_text": dict(num_attention_heads=2, ffn_hidden_size=40, hidden_size=44, num_layers=3),
}


def _make_hf(name: str, folder: Path):
    model_type, fields = FAMILIES[name]
    model = random_hf_model(model_type, fields, sorted(FAMILIES).index(name) + 20, folder)
    _write_tokenizer(folder, 250)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF folder, our checkpoint, input ids, HF fp32 logits)."""
    return convert_all(tmp_path_factory.mktemp("hf_gemma"), FAMILIES, _make_hf, VOCAB, SEQ, 3)


def test_the_parts_are_read_from_config_json():
    hf = dict(FAMILIES["gemma3_text"][1], model_type="gemma3_text")
    cfg = keymap.model_config_from_hf(hf)
    assert (cfg.layernorm_zero_centered_gamma, cfg.embedding_scale_sqrt_hidden,
            cfg.post_sublayer_norms, cfg.qk_layernorm) == (True, True, True, True)
    assert (cfg.rotary_base, cfg.rotary_base_local, cfg.sliding_window) == (1000.0, 10.0, WINDOW)
    assert cfg.layer_types == hf["layer_types"] and cfg.softmax_scale == 24 ** -0.5
    assert cfg.activation == "gelu_tanh" and not cfg.share_embeddings_and_output_weights
    g2 = keymap.model_config_from_hf(dict(FAMILIES["gemma2"][1], model_type="gemma2"))
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (0.5, 3.0)
    assert not g2.qk_layernorm and g2.rotary_base_local is None
    assert keymap.default_model_type(cfg) == "gemma3_text"
    assert keymap.default_model_type(g2) == "gemma2"


def test_what_cannot_be_converted_is_refused_by_field():
    base = dict(FAMILIES["gemma3_text"][1], model_type="gemma3_text")
    with pytest.raises(ConfigError) as e:
        keymap.model_config_from_hf(dict(base, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}))
    assert e.value.field.endswith(":rope_parameters")
    with pytest.raises(ConfigError) as e:
        keymap.model_config_from_hf(dict(base, model_type="gemma3"))
    assert e.value.field.endswith(":model_type") and "gemma3_text" in str(e.value)
    with pytest.raises(ConfigError) as e:
        keymap.model_config_from_hf(dict(base, layer_types=["full_attention"]))
    assert e.value.field.endswith(":layer_types")
    cfg = keymap.model_config_from_hf(base)
    assert "Gemma" in keymap.hf_export_problem(cfg, "llama")
    import dataclasses

    odd = dataclasses.replace(cfg, hidden_size=42, num_attention_heads=4)  # 42 % 4 != 0
    assert "not divisible" in keymap.hf_export_problem(odd, "gemma3_text")


def test_cli_refuses_the_multimodal_gemma3_in_one_line(tmp_path):
    import transformers

    hf = transformers.AutoConfig.for_model("gemma3", text_config=dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2)).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    proc = minitron("convert", "convert.direction=hf_to_mcore", f"convert.input={tmp_path}",
                    f"convert.output={tmp_path / 'out'}")
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.startswith("minitron: error:")]
    assert proc.returncode == 2, err
    assert len(lines) == 1 and "config.json:model_type" in lines[0] and "gemma3_text" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_bit_exact(converted, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_minitron.checkpoint.dist import read_header

    hf_dir, ckpt, _, _ = converted[name]
    out = mcore_to_hf(str(ckpt), str(tmp_path / "hf"), dtype="float32")
    assert_same_weights(hf_dir, out)
    c0, c1 = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    fields = ARCH_FIELDS + ("sliding_window", "layer_types", "query_pre_attn_scalar",
                            "attn_logit_softcapping", "final_logit_softcapping")
    assert {k: c0.get(k) for k in fields} == {k: c1.get(k) for k in fields}
    if name == "gemma3_text":
        assert c0["rope_parameters"] == c1["rope_parameters"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == c0["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    cfg = read_header(str(ckpt)).model
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
    names = list(FAMILIES)
    per_rank = run_distributed(_megatron_logits, 2, tp, pp, [converted[n][1] for n in names],
                               converted[names[0]][2])
    for i, name in enumerate(names):
        logits, hf_logits = per_rank[-1][i], converted[name][3]
        print(f"\n{name} TP={tp} PP={pp} logits rel diff {_rel(logits, hf_logits):.2e}")
        assert _rel(logits, hf_logits) < 1e-4, name


def test_each_gemma_prunes_distills_and_exports(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    jobs = [(n, str(converted[n][1]), PRUNE[n], converted[n][2]) for n in FAMILIES]
    (results,) = run_distributed(compress, 1, str(tmp_path), jobs)
    for name, (pruned_hf, kd_hf, ours) in results.items():
        model_type, src = FAMILIES[name]
        want = dict(src, **PRUNE[name])
        ids = converted[name][2]
        for folder, logits in zip((pruned_hf, kd_hf), ours):
            cfg = json.loads((Path(folder) / "config.json").read_text())
            assert cfg["model_type"] == model_type, folder
            assert cfg["hidden_size"] == want["hidden_size"]
            assert cfg["num_hidden_layers"] == want["num_layers"]
            if "layer_types" in src:  # the kept layers keep their kind
                assert len(cfg["layer_types"]) == want["num_layers"]
                assert set(cfg["layer_types"]) <= set(src["layer_types"])
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            sd = model.state_dict()
            h = want["hidden_size"]
            for key, shape in (("model.norm.weight", (h,)),
                               ("model.layers.0.input_layernorm.weight", (h,)),
                               ("model.embed_tokens.weight", (VOCAB, h))):
                assert sd[key].shape == shape, key
            if model_type != "gemma":
                for n in ("post_attention", "pre_feedforward", "post_feedforward"):
                    assert sd[f"model.layers.0.{n}_layernorm.weight"].shape == (h,)
            with torch.no_grad():
                hf_logits = model(ids).logits
            print(f"\n{name} {Path(folder).name} logits rel diff {_rel(logits, hf_logits):.2e}")
            assert _rel(logits, hf_logits) < 1e-4, folder
