"""`minitron pipeline experiment=smoke_moe`: a tiny MoE teacher through importance (expert
scores), expert and expert-FFN pruning, distillation, eval and the Hugging Face export."""

import json

import pytest
import torch

from cli_process import minitron


@pytest.fixture(scope="module")
def smoke_moe(tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke_moe")
    p = minitron("pipeline", "experiment=smoke_moe", f"run.dir={run}")
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    return run


def test_smoke_moe_pipeline_prunes_experts_and_exports(smoke_moe):
    from transformers import AutoModelForCausalLM

    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.importance.scores import load_scores

    run = smoke_moe
    scores = load_scores(str(run / "importance" / "scores.safetensors"))
    assert scores.tensors["moe.experts"].shape == (2, 4)
    assert scores.tensors["moe.expert_tokens"].sum() > 0
    summary = json.loads((run / "summary.json").read_text())
    pruned = read_header(str(run / "prune" / "checkpoint")).model
    assert (pruned.num_moe_experts, pruned.moe_ffn_hidden_size,
            pruned.moe_shared_expert_intermediate_size) == (2, 32, 32)
    distilled = read_header(str(run / "distill" / "checkpoints")).model
    assert distilled == pruned
    model = AutoModelForCausalLM.from_pretrained(run / "export" / "hf").eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config.num_experts == 2
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["distilled"]["params"] == rows["pruned"]["params"] == pruned.num_parameters()
    assert rows["pruned"]["params"] < rows["teacher"]["params"]
