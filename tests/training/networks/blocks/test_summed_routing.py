"""Summed intersectional routing (``AttributeRouterBank(num_attributes=(3, 2))``): the router
of a combination is the sum of its parts' routers; one part is exactly the old bank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.networks.blocks import MoESpec
from training.networks.blocks.routing import AttributeRouterBank, attribute_parts
from training.networks.blocks.tokens import build_moe

C, E = 8, 5


def _bank(parts, unknown_router=True, router_bias=False, seed=0):
    torch.manual_seed(seed)
    bank = AttributeRouterBank(C, E, top_k=2, num_attributes=parts,
                               unknown_router=unknown_router, router_bias=router_bias)
    with torch.no_grad():  # zero init would make every router equal
        bank.w_gate.normal_()
        bank.w_noise.normal_()
        if router_bias:
            bank.b_gate.normal_()
    return bank.eval()


def _logits(bank, x, routers):
    """Independent transcription: the sum over the listed router rows of ``x W (+ b)``."""
    out = 0
    for r in routers:
        out = out + x @ bank.w_gate[r] + (bank.b_gate[r] if bank.router_bias else 0)
    return out


@pytest.mark.parametrize("router_bias", [False, True])
def test_summed_router_is_the_sum_of_the_parts_logits(router_bias):
    bank = _bank((3, 2), router_bias=router_bias)
    # layout: race 0..2, race-unknown 3, gender 4..5, gender-unknown 6
    assert bank.num_routers == 3 + 1 + 2 + 1
    x = torch.randn(7, 4, C)
    attr = torch.tensor([0, 1, 2, 3, 4, 5, -1])
    total = bank.part_logits(x, attr).sum(0)
    for i, a in enumerate(attr.tolist()):
        routers = [3, 6] if a < 0 else [a // 2, 4 + a % 2]  # mixed radix: race * 2 + gender
        assert torch.allclose(total[i], _logits(bank, x[i], routers), atol=1e-5), a
    out = bank(x, attr)  # the routing itself uses the summed logits
    want = total.topk(2, dim=-1)
    assert torch.equal(out.indices, want.indices)
    assert torch.allclose(out.gates, torch.softmax(want.values, -1), atol=1e-6)


def test_noise_weights_are_summed_too():
    bank = _bank((2, 3))
    combos = torch.tensor([0, 5, -1])
    got = bank._weights(bank.w_noise, bank.router_index(combos))
    # (1, 2) -> part rows: part 0 value 1 (row 1), part 1 value 2 (row 3 + 2 = 5)
    assert torch.allclose(got[1], bank.w_noise[1] + bank.w_noise[5])
    assert torch.allclose(got[2], bank.w_noise[2] + bank.w_noise[6])  # both unknown routers


def test_one_part_is_exactly_the_single_attribute_bank():
    old, new = _bank(3, seed=1), _bank((3,), seed=2)
    new.load_state_dict(old.state_dict())
    assert not new.summed and new.num_routers == old.num_routers == 4
    assert set(new.state_dict()) == set(old.state_dict())
    x, attr = torch.randn(4, 6, C), torch.tensor([0, 2, -1, 1])
    a, b = old(x, attr), new(x, attr)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.gates, b.gates)
    # the single-attribute semantics: router = attribute, -1 = the extra router
    want = torch.stack([x[i] @ old.w_gate[r] for i, r in enumerate([0, 2, 3, 1])])
    assert torch.allclose(old.part_logits(x, attr)[0], want, atol=1e-5)


def test_unseen_combination_uses_its_parts_not_the_unknown_router():
    bank = _bank((3, 2))
    x = torch.randn(1, 5, C)
    unseen = bank.part_logits(x, torch.tensor([5])).sum(0)  # (2, 1), maybe never trained
    unknown = bank.part_logits(x, torch.tensor([-1])).sum(0)
    assert torch.allclose(unseen[0], _logits(bank, x[0], [2, 5]), atol=1e-5)
    assert not torch.allclose(unseen, unknown)


def test_unknown_without_unknown_routers_sums_each_parts_mean():
    bank = _bank((3, 2), unknown_router=False)
    assert bank.num_routers == 5
    x = torch.randn(2, 3, C)
    got = bank.part_logits(x, torch.tensor([-1, 4])).sum(0)
    mean_w = bank.w_gate[:3].mean(0) + bank.w_gate[3:].mean(0)
    assert torch.allclose(got[0], x[0] @ mean_w, atol=1e-5)
    assert torch.allclose(got[1], _logits(bank, x[1], [2, 3]), atol=1e-5)


def test_parts_table_is_not_saved_and_indices_are_checked():
    bank = _bank((3, 2))
    assert "part_routers" not in bank.state_dict()  # derived; checkpoints stay the same
    with pytest.raises(ValueError, match="attribute indices"):
        bank(torch.randn(1, 2, C), torch.tensor([6]))
    assert attribute_parts([3, 2]) == (3, 2) and attribute_parts(4) == (4,)
    with pytest.raises(ValueError, match="num_attributes"):
        attribute_parts((3, 0))


def test_spec_attribute_parts_from_json_and_checked_against_num_attributes():
    spec = MoESpec.of({"attribute_parts": [3, 2], "num_experts": 4})
    assert spec.attribute_parts == (3, 2)
    layer = build_moe("dmoe", 16, spec, num_attributes=6)
    assert layer.router.parts == (3, 2) and layer.num_attributes == 6
    assert build_moe("moe", 16, spec, num_attributes=6).router.parts == (1,)
    with pytest.raises(ValueError, match="attribute_parts"):
        build_moe("dmoe", 16, spec, num_attributes=5)
    with pytest.raises(ValueError, match="attribute_parts"):
        MoESpec(attribute_parts=(2, 0))


MODELS = Path(__file__).parents[4] / "src" / "napari_dmoe" / "models"


@pytest.mark.parametrize("name", sorted(p.name for p in MODELS.glob("*.safetensors")))
def test_bundled_models_keep_single_attribute_routing(name):
    from training.checkpoint import load_checkpoint

    model, meta = load_checkpoint(MODELS / name, device="cpu")
    banks = [m for m in model.modules() if isinstance(m, AttributeRouterBank)]
    assert banks
    n = len(meta["attribute"]["vocabulary"])
    for bank in banks:
        assert bank.parts == (n,) and not bank.summed
        x = torch.randn(2, 3, bank.embed_dim)
        attr = torch.tensor([0, -1])
        r = bank.router_index(attr)
        want = torch.stack([x[i] @ bank.w_gate[r[i]] for i in range(2)])
        if bank.router_bias:
            want = want + bank.b_gate[r][:, None]
        assert torch.allclose(bank.part_logits(x, attr)[0], want, atol=1e-5)
