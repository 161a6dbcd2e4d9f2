"""Hugging Face interop: key maps, import/export parity at TP=1, TP=2 and PP=2, round trips,
bad inputs, the CLI, and the embedded SmolLM2 teacher."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from hf_fixtures import assert_same_weights, random_hf_model
from megatron_minitron.checkpoint import hf_keymap as keymap
from megatron_minitron.checkpoint.hf import hf_export_problem, hf_to_mcore, mcore_to_hf
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig

VOCAB, SEQ = 300, 12
TINY = dict(vocab_size=VOCAB, intermediate_size=96, num_hidden_layers=4,
            max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    # 3 query groups, head_dim 16 != 72/6, untied, Llama 3.1 rope scaling
    "llama": dict(TINY, hidden_size=72, num_attention_heads=6, num_key_value_heads=3,
                  head_dim=16, tie_word_embeddings=False, rope_theta=50000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # hidden 64 not divisible by 6 heads (only exportable as mistral), untied
    "mistral": dict(TINY, hidden_size=64, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=12, tie_word_embeddings=False, sliding_window=None),
    # QKV bias, tied embeddings, head_dim 24 != 64/4
    "qwen2": dict(TINY, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, tie_word_embeddings=True),
}
ARCH_FIELDS = ("architectures", "model_type", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")


def _write_tokenizer(folder: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def _make_hf(family: str, folder: Path):
    seed = {"llama": 1, "mistral": 2, "qwen2": 3}[family]
    model = random_hf_model(family, FAMILIES[family], seed, folder)
    _write_tokenizer(folder, 250)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF folder, our checkpoint, input ids, HF fp32 logits)."""
    root = tmp_path_factory.mktemp("hf_interop")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    out = {}
    for family in FAMILIES:
        model = _make_hf(family, root / family)
        with torch.no_grad():
            logits = model(ids).logits
        ckpt = hf_to_mcore(str(root / family), str(root / f"{family}_mcore"))
        out[family] = (root / family, ckpt, ids, logits)
    return out


def _setup(tp: int, pp: int):
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.runtime.distributed import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
    return parallel, runtime, initialize(parallel, runtime)


def _load(path, parallel, runtime, ctx):
    from megatron_minitron.checkpoint import dist as dist_ckpt
    from megatron_minitron.models.builder import build_model

    cfg = dist_ckpt.read_header(str(path)).model
    model = build_model(cfg, parallel, runtime, ctx.device)[0].eval()
    dist_ckpt.load(str(path), [model], ctx=ctx)
    return model, cfg


def _forward(model, cfg, ids, ctx):
    """Full-vocab logits [b, s, v] on the last stage, None on the others."""
    import torch.distributed as dist

    pp_ranks = dist.get_process_group_ranks(ctx.pp_group)
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    with torch.no_grad():
        if not ctx.is_first_stage:
            # [s, b, h] in the stages' activation dtype (bf16 under runtime.precision=bf16)
            dtype = next(model.parameters()).dtype
            hidden = torch.empty(s, b, cfg.hidden_size, dtype=dtype)
            dist.recv(hidden, src=pp_ranks[ctx.pp_rank - 1])
            model.set_input_tensor(hidden)
        out = model(ids, pos, attention_mask=None)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), dst=pp_ranks[ctx.pp_rank + 1])
            return None
    if ctx.tp_size > 1:  # [b, s, v/tp] -> [b, s, v]
        shards = [torch.empty_like(out) for _ in range(ctx.tp_size)]
        dist.all_gather(shards, out.contiguous(), group=ctx.tp_group)
        out = torch.cat(shards, dim=-1)
    return out[..., : cfg.vocab_size]


def _megatron_logits(tp: int, pp: int, ckpts, ids):
    """Logits of each checkpoint at this TP/PP (None on ranks that do not hold them)."""
    parallel, runtime, ctx = _setup(tp, pp)
    return [_forward(*_load(path, parallel, runtime, ctx), ids, ctx) for path in ckpts]


def tp1_logits(ckpt, ids) -> torch.Tensor:
    """Our logits of one checkpoint at TP=1, PP=1, in this process (its groups torn down)."""
    from megatron_minitron.runtime.distributed import teardown

    try:
        (logits,) = _megatron_logits(1, 1, [ckpt], ids)
    finally:
        teardown()
    return logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_rope_convention_matches_hf_rotate_half():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from megatron_minitron.runtime import cpu_compat

    if not torch.cuda.is_available():
        cpu_compat.install()  # RotaryEmbedding moves inv_freq to torch.cuda.current_device()
    s, b, n, d = 10, 2, 3, 16
    q = torch.randn(s, b, n, d)
    freqs = RotaryEmbedding(d, 1.0, rotary_base=10000, use_cpu_initialization=True)(s)
    ours = _apply_rotary_pos_emb_bshd(q, freqs, rotary_interleaved=False)
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=n * d, num_attention_heads=n))
    pos = torch.arange(s).unsqueeze(0)
    cos, sin = hf_rope(q, pos)
    hq = q.permute(1, 2, 0, 3)  # [s, b, n, d] -> [b, n, s, d]
    theirs, _ = apply_rotary_pos_emb(hq, hq, cos, sin)
    assert torch.allclose(ours.permute(1, 2, 0, 3), theirs, atol=1e-6)
    interleaved = _apply_rotary_pos_emb_bshd(q, freqs, rotary_interleaved=True)
    assert not torch.allclose(interleaved.permute(1, 2, 0, 3), theirs, atol=1e-3)


def test_keymap_qkv_layout_round_trip():
    cfg = ModelConfig(hidden_size=8, num_attention_heads=6, num_query_groups=3, kv_channels=2,
                      num_layers=1, ffn_hidden_size=4, vocab_size=5)
    tm = next(t for t in keymap.tensor_maps(cfg) if t.kind == "qkv")
    q, k, v = (torch.randn(shape) for shape in keymap.hf_shapes(tm, cfg))
    fused = keymap.to_mcore(tm, [q, k, v], cfg)
    # group 1 = q heads 2,3 then k head 1 then v head 1 (megatron's per-group interleave)
    group1 = fused[8:16]
    assert torch.equal(group1[:4], q[4:8]) and torch.equal(group1[4:6], k[2:4])
    assert torch.equal(group1[6:8], v[2:4])
    assert all(torch.equal(a, b) for a, b in zip(keymap.to_hf(tm, fused, cfg), [q, k, v]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_tp1(converted, family):
    _, ckpt, ids, hf_logits = converted[family]
    logits = tp1_logits(ckpt, ids)
    assert logits.shape == hf_logits.shape
    print(f"\n{family} TP=1 logits rel diff {_rel(logits, hf_logits):.2e}")
    assert _rel(logits, hf_logits) < 1e-4


@pytest.mark.parametrize("tp,pp,families", [(2, 1, ("mistral", "qwen2")),
                                            (1, 2, ("llama", "mistral", "qwen2"))])
def test_parity_tp2_pp2(converted, tp, pp, families):
    """The TP=1 checkpoint loads resharded; 3 query groups cannot split over TP=2."""
    ckpts = [converted[f][1] for f in families]
    ids = converted[families[0]][2]
    per_rank = run_distributed(_megatron_logits, 2, tp, pp, ckpts, ids)
    for i, family in enumerate(families):
        logits = per_rank[-1][i]
        print(f"\n{family} TP={tp} PP={pp} logits rel diff {_rel(logits, converted[family][3]):.2e}")
        assert _rel(logits, converted[family][3]) < 1e-4, family
        if tp > 1:
            assert torch.equal(per_rank[0][i], logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_hf_mcore_hf(converted, family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, ckpt, _, _ = converted[family]
    out = mcore_to_hf(str(ckpt), str(tmp_path / "hf"), dtype="float32")
    assert_same_weights(hf_dir, out)
    c0, c1 = json.loads((hf_dir / "config.json").read_text()), json.loads(
        (out / "config.json").read_text())
    assert {k: c0.get(k) for k in ARCH_FIELDS} == {k: c1.get(k) for k in ARCH_FIELDS}
    assert AutoConfig.from_pretrained(hf_dir).rope_parameters == AutoConfig.from_pretrained(
        out).rope_parameters
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == c0["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_sharded_safetensors_import(converted, tmp_path):
    """model.safetensors.index.json + shards import to the same tensors as the single file."""
    from transformers import AutoModelForCausalLM

    hf_dir = converted["llama"][0]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(hf_dir / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    ckpt = hf_to_mcore(str(sharded), str(tmp_path / "ckpt"))
    out = mcore_to_hf(str(ckpt), str(tmp_path / "hf"), dtype="float32")
    assert_same_weights(hf_dir, out)


def test_hf_export_problem():
    ok = ModelConfig(hidden_size=64, num_attention_heads=4, num_query_groups=2)
    assert hf_export_problem(ok) is None
    odd = ModelConfig(hidden_size=64, num_attention_heads=6, num_query_groups=3, kv_channels=16)
    assert "not divisible" in hf_export_problem(odd)
    assert hf_export_problem(odd, "mistral") is None
    assert "RMSNorm" in hf_export_problem(ModelConfig(normalization="LayerNorm"))
    assert "qwen2" in hf_export_problem(ModelConfig(add_qkv_bias=True), "llama")
    with pytest.raises(ConfigError, match="cannot export"):
        keymap.hf_config_from_model(odd, "llama", "bfloat16")


def _bad_folder(converted, tmp_path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(converted["qwen2"][0], bad)
    return bad


def test_bad_inputs_name_file_and_field(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _bad_folder(converted, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ConfigError, match="llama.*mistral.*qwen2") as e:
        hf_to_mcore(str(bad), str(tmp_path / "o1"))
    assert e.value.field.endswith("config.json:model_type")
    (bad / "config.json").write_text(json.dumps(cfg))

    _write_tokenizer(bad, VOCAB + 100)
    with pytest.raises(ConfigError, match="400 tokens") as e:
        hf_to_mcore(str(bad), str(tmp_path / "o2"))
    assert e.value.field.endswith("tokenizer.json:vocab")
    _write_tokenizer(bad, 250)

    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file(dict(tensors, **{name: tensors[name].to(torch.int8)}), bad / "model.safetensors")
    with pytest.raises(ConfigError, match="int8") as e:
        hf_to_mcore(str(bad), str(tmp_path / "o3"))
    assert e.value.field.endswith(f"model.safetensors:{name}")

    save_file(tensors, bad / "model.safetensors")
    cfg_untied = dict(cfg, tie_word_embeddings=False)
    (bad / "config.json").write_text(json.dumps(cfg_untied))
    with pytest.raises(ConfigError, match="missing") as e:
        hf_to_mcore(str(bad), str(tmp_path / "o3b"))
    assert e.value.field.endswith(":lm_head.weight")
    (bad / "config.json").write_text(json.dumps(cfg))

    shard = {k: "model-00001-of-00002.safetensors" for k in tensors}
    shard["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
    with pytest.raises(ConfigError, match="model-00002-of-00002") as e:
        hf_to_mcore(str(bad), str(tmp_path / "o4"))
    assert e.value.field.endswith("model.safetensors.index.json:weight_map")

    with pytest.raises(ConfigError) as e:
        mcore_to_hf(str(converted["qwen2"][1]), str(tmp_path / "o5"), dtype="int8")
    assert e.value.field == "convert.dtype"


def test_cli_convert(converted, tmp_path):
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.cli.convert import load_convert_config, main

    hf_dir, ckpt, _, _ = converted["llama"]
    main(["convert.direction=hf_to_mcore", f"convert.input={hf_dir}",
          f"convert.output={tmp_path / 'ckpt'}"])
    assert read_header(str(tmp_path / "ckpt")).model == read_header(str(ckpt)).model
    with pytest.raises(ConfigError) as e:
        load_convert_config(["convert.direction=sideways"])
    assert e.value.field == "convert.direction"
    with pytest.raises(ConfigError):
        main(["convert.direction=mcore_to_hf"])


@pytest.mark.slow
def test_smollm2_teacher(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_minitron.checkpoint.smollm2 import fetch_smollm2
    from megatron_minitron.runtime.distributed import teardown

    hf_dir = fetch_smollm2()
    ckpt = hf_to_mcore(str(hf_dir), str(tmp_path / "smollm2"))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
            "and Berlin is the capital of Germany.")
    ids = tok(text, return_tensors="pt").input_ids
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    try:
        with torch.no_grad():
            hf_logits = model(ids).logits
        parallel, runtime, ctx = _setup(1, 1)
        ours_model, cfg = _load(ckpt, parallel, runtime, ctx)
        ours = _forward(ours_model, cfg, ids, ctx)
        rel = _rel(ours, hf_logits)

        def ppl(logits):
            return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())

        def greedy(step):
            seq = prompt
            for _ in range(6):
                seq = torch.cat([seq, step(seq)[:, -1:].argmax(-1)], dim=1)
            return seq[0, prompt.shape[1]:].tolist()

        with torch.no_grad():
            hf_greedy = greedy(lambda seq: model(seq).logits)
        ours_greedy = greedy(lambda seq: _forward(ours_model, cfg, seq, ctx))
    finally:
        teardown()
    print(f"\nSmolLM2 logits rel diff {rel:.2e}; perplexity megatron {ppl(ours):.4f} vs "
          f"transformers {ppl(hf_logits):.4f}; greedy {tok.decode(ours_greedy)!r}")
    assert rel < 1e-4
    assert ours_greedy == hf_greedy
    assert abs(ppl(ours) - ppl(hf_logits)) < 1e-3 * ppl(hf_logits)
