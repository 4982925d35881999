"""python -m training.profile: JSON schema, paper Table 7 targets, analytic MoE FLOPs."""

from __future__ import annotations

import json
import time

import pytest
import torch

from training.flops import count_flops, count_params, moe_flops_per_token
from training.networks import DMoE, create_model
from training.profile import main


def _run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object, nothing else


def _additions(result, moe="dmoe"):
    d_params = (result[moe]["params"] - result["none"]["params"]) / 1e6
    d_gflops = result[moe]["gflops"] - result["none"]["gflops"]
    return d_params, d_gflops


def test_json_schema(capsys):
    result = _run_json(capsys, "--arch", "resunet", "--preset", "tiny", "--size", "64", "64")
    assert list(result) == ["none", "moe", "dmoe", "separate"]
    for name, row in result.items():
        assert set(row) == {"params", "gflops"} | (
            {"gflops_per_patient"} if name == "separate" else set())
        assert isinstance(row["params"], int) and isinstance(row["gflops"], float)
        assert row["gflops"] > 0
    assert result["none"]["params"] < result["moe"]["params"] < result["dmoe"]["params"]


def test_transunet_paper_matches_table7(capsys):
    start = time.monotonic()
    result = _run_json(capsys, "--arch", "transunet", "--preset", "paper")
    assert time.monotonic() - start < 20  # meta device: seconds, not a real ViT-B forward
    d_params, d_gflops = _additions(result)
    assert d_params == pytest.approx(37.8, rel=0.05)
    assert d_gflops == pytest.approx(44.4, rel=0.05)
    assert _additions(result, "moe")[1] == pytest.approx(d_gflops)  # same experts run


def test_resunet3d_paper_matches_table7(capsys):
    result = _run_json(
        capsys, "--arch", "resunet", "--preset", "paper", "--spatial-dims", "3",
        "--size", "384", "384", "128",
    )
    d_params, d_gflops = _additions(result)
    assert d_params == pytest.approx(12.7, rel=0.05)
    assert d_gflops == pytest.approx(219, rel=0.05)


def test_table_output_and_errors(capsys):
    assert main(["--arch", "transunet", "--preset", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "GFLOPs" in text and all(mode in text for mode in ("none", "moe", "dmoe"))
    assert main(["--arch", "transunet", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["--arch", "resunet", "--spatial-dims", "3", "--size", "64", "64"]) == 2
    assert "--size needs 3 values" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--arch", "unet"])


def test_analytic_moe_flops_match_the_layer():
    layer = DMoE(16, num_experts=4, top_k=2, num_attributes=3)
    # router 2*C*E + k * (2*C*4C + 2*4C*C)
    assert moe_flops_per_token(layer) == 2 * 16 * 4 + 2 * (2 * 16 * 64 * 2)
    model = create_model("resunet", preset="tiny", moe="moe", num_experts=4, top_k=1)
    plain = create_model("resunet", preset="tiny", moe="none")
    flops, base = count_flops(model, (1, 1, 64, 64)), count_flops(plain, (1, 1, 64, 64))
    assert flops.backbone == base.backbone and base.moe == 0
    tokens = [32 * 32, 16 * 16, 8 * 8, 4 * 4, 2 * 2]
    widths = [8, 16, 32, 48, 64]
    expected = sum(n * (2 * c * 4 + 16 * c * c) for n, c in zip(tokens, widths, strict=True))
    assert flops.moe == expected
    # Counting left the model intact and runnable.
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, DMoE))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
