"""bench/gpu_check.sh's pieces that run without a GPU: the FLOP count behind its MFU, its
summary when steps fail or leave nothing, and the script's syntax."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_flops_per_token_counts_every_weight_and_causal_attention():
    from kd_step import flops_per_token

    from megatron_minitron.config.loader import load_config

    smollm2 = load_config(["model=smollm2_135m"]).model
    # SmolLM2-135M has 134,515,008 weights with its tied 49,152 x 576 embedding, which is also
    # the output layer's matrix: each costs 2 FLOPs per token forward
    attention = 2 * 30 * 1024 * 9 * 64  # QK^T and AV over half of the [1024, 1024] square
    assert flops_per_token(smollm2, 1024, training=False) == 2 * 134_515_008 + attention
    assert flops_per_token(smollm2, 1024, training=True) == 3 * (2 * 134_515_008 + attention)


def test_summary_reports_failed_and_missing_steps(tmp_path):
    import gpu_check

    (tmp_path / "logs").mkdir()
    (tmp_path / "steps.tsv").write_text("env\t0\t1.5\tlogs/env.log\n"
                                        "parity\t1\t30.0\tlogs/parity.log\n"
                                        "pipeline\t124\t0.0\tlogs/pipeline.log\n")
    (tmp_path / "env.json").write_text(json.dumps({"cuda_available": False}))
    (tmp_path / "parity.json").write_text("{not json")  # a step killed while writing
    gpu_check.summary(str(tmp_path))
    record = json.loads((tmp_path / "summary.json").read_text())
    assert [s["rc"] for s in record["steps"]] == [0, 1, 124]
    assert record["env"] == {"cuda_available": False}
    assert record["parity"] is None and record["pipeline"] is None
    assert record["kd_vs_hf"] is None and "mfu_vs_measured_matmul" not in record
    text = (tmp_path / "summary.txt").read_text()
    assert "parity: missing" in text and "rc=124" in text


def test_gpu_check_script_parses_and_passes_shellcheck():
    script = str(BENCH / "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install -e .[dev] brings it)")
    p = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
