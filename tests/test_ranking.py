"""Layer ranking: per-channel gradient norms, RGN / LaRa accumulation, the top-K rule, profiles."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from trady.core.errors import TradyError
from trady.engine.costs import CostTable, LayerInfo, analyze
from trady.experiments.report import plot_profile
from trady.selection import rank_run, ranking
from trady.selection.ranking import LayerRank, RankAccumulator, RankingProfile, channel_norms, top_k_count


class Tiny(nn.Module):
    """conv (groups 1) -> depthwise -> grouped conv (groups 2) -> mean pool -> linear -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=4)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2)
        self.hidden = nn.Linear(6, 5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.dw(x))
        x = self.grouped(x).mean((2, 3))
        return self.classifier(torch.relu(self.hidden(x)))


def hand_norms(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Loop over input channels, slicing the weight exactly as method.md describes."""
    c_out, c_local = w.shape[0], w.shape[1]
    per_group = c_out // groups
    out = []
    for c in range(groups * c_local):
        g, l = divmod(c, c_local)
        out.append(float(w[g * per_group : (g + 1) * per_group, l].pow(2).sum().sqrt()))
    return torch.tensor(out, dtype=torch.float64)


def test_channel_norms_match_hand_slicing():
    torch.manual_seed(0)
    conv = torch.randn(5, 3, 3, 3)
    assert torch.allclose(channel_norms(conv, 1).double(), torch.stack([conv[:, c].norm() for c in range(3)]).double())
    dw = torch.randn(4, 1, 3, 3)
    assert torch.allclose(channel_norms(dw, 4).double(), torch.stack([dw[c].norm() for c in range(4)]).double())
    grouped = torch.randn(6, 2, 1, 1)  # 4 in, groups 2: channel 3 = group 1, local 1 -> rows 3..5, column 1
    got = channel_norms(grouped, 2)
    assert math.isclose(float(got[3]), float(grouped[3:6, 1].norm()), rel_tol=1e-6)
    assert torch.allclose(got.double(), hand_norms(grouped, 2), rtol=1e-6)
    lin = torch.randn(7, 4)
    assert torch.allclose(channel_norms(lin).double(), torch.stack([lin[:, c].norm() for c in range(4)]).double())
    # depthwise with channel multiplier 2: channel c owns weight[2c:2c+2]
    dw2 = torch.randn(8, 1, 3, 3)
    assert math.isclose(float(channel_norms(dw2, 4)[1]), float(dw2[2:4].norm()), rel_tol=1e-6)
    with pytest.raises(TradyError):
        channel_norms(torch.randn(5), 1)


def test_rank_accumulator_matches_hand_computation():
    torch.manual_seed(0)
    model = Tiny()
    costs = analyze(model, input_shape=(1, 3, 8, 8))
    assert costs.classifier == "classifier"
    assert costs.names == ["conv", "dw", "grouped", "hidden"]
    acc = RankAccumulator(model, costs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sums = {n: torch.zeros(costs.by_name[n].in_channels, dtype=torch.float64) for n in costs.names}
    fro = dict.fromkeys(costs.names, 0.0)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8)
        y = torch.tensor([0, 1, 2, step % 3])
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        acc.update()
        for n in costs.names:
            m = model.get_submodule(n)
            g = m.weight.grad.detach().double()
            sums[n] += hand_norms(g, getattr(m, "groups", 1))
            fro[n] += float(g.norm())
        opt.step()
    assert acc.iterations == 3
    for n in costs.names:
        lay = costs.by_name[n]
        assert torch.allclose(acc.channel_norm_sum[n], sums[n], rtol=1e-5)
        rgn = sums[n] / (lay.weight_units_per_channel + lay.activation_units_per_channel)
        assert torch.allclose(acc.channel_rgn(n), rgn, rtol=1e-5)
        assert math.isclose(acc.layer_rgn(n), float(rgn.sum()), rel_tol=1e-5)
        assert math.isclose(acc.lara(n), fro[n] / (lay.in_channels * lay.space_units_per_channel), rel_tol=1e-5)
    # units of the hand model: conv C^W = 4*9 = 36, C^A = 64; dw 9 + 64; grouped 3 + 16; hidden 5 + 1
    assert [costs.by_name[n].space_units_per_channel for n in costs.names] == [100, 73, 19, 6]
    prof = acc.profile("tiny", 8, "random", 1, 0)
    assert prof.names == costs.names and prof.iterations == 3
    assert prof.by_name["dw"].rgn == pytest.approx(acc.layer_rgn("dw"))
    assert prof.by_name["hidden"].weight_units == 5 and prof.by_name["hidden"].activation_units == 1


def test_rank_accumulator_skips_layers_without_grad():
    model = Tiny()
    costs = analyze(model, input_shape=(1, 3, 8, 8))
    model.conv.weight.requires_grad_(False)
    acc = RankAccumulator(model, costs)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    acc.update()
    assert acc.layer_rgn("conv") == 0.0 and acc.layer_rgn("dw") > 0.0
    bad = CostTable([LayerInfo("nope", "conv", 3, 4, (3, 3), 1, (8, 8), (8, 8))], classifier="classifier")
    with pytest.raises(TradyError, match="'nope'"):
        RankAccumulator(model, bad)


def test_top_k_rule_hand_example():
    # sorted 50, 30, 15, 4, 1 (total 100): cumulated 50, 80, 95, 99, 100
    values = [4.0, 30.0, 1.0, 50.0, 15.0]
    assert top_k_count(values, 0.97) == 4
    assert top_k_count(values, 0.95) == 3  # reaching exactly the threshold counts
    assert top_k_count(values, 0.951) == 4
    assert top_k_count(values, 0.5) == 1
    assert top_k_count(values, 1.0) == 5
    assert top_k_count([0.0, 0.0], 0.97) == 2
    with pytest.raises(TradyError):
        top_k_count(values, 0.0)


def make_profile(rgn: list[float], names=None) -> RankingProfile:
    names = names or [f"l{i}" for i in range(len(rgn))]
    layers = [LayerRank(n, "conv", 4, grad_norm=2 * r, rgn=r, lara=r / 10, weight_units=3, activation_units=7)
              for n, r in zip(names, rgn)]  # fmt: skip
    return RankingProfile("tiny", 32, "digits", 2, 1, layers, iterations=10, extra={"lr": 0.05})


def test_profile_top_k_order_and_share():
    p = make_profile([4.0, 30.0, 1.0, 50.0, 15.0])
    assert p.order == ["l3", "l1", "l4", "l0", "l2"]
    assert p.k() == 4
    assert p.top_k() == ["l3", "l1", "l4", "l0"]
    assert p.top_k(0.5) == ["l3"]
    assert p.top_k(k=2) == ["l3", "l1"]
    assert p.cumulative_share() == pytest.approx([0.5, 0.8, 0.95, 0.99, 1.0])
    assert p.order_by("lara") == p.order
    with pytest.raises(TradyError, match="ranking key"):
        p.order_by("rgm")


def test_profile_json_round_trip(tmp_path):
    p = make_profile([4.0, 30.0, 1.0, 50.0, 15.0])
    d = p.to_dict()
    for key in ["model", "resolution", "dataset", "epochs", "seed", "threshold", "k", "layers", "order",
                "cumulative_share"]:  # fmt: skip
        assert key in d
    assert d["k"] == 4 and d["threshold"] == 0.97
    assert set(d["layers"][0]) == {"name", "kind", "in_channels", "grad_norm", "rgn", "lara", "weight_units",
                                   "activation_units"}  # fmt: skip
    q = RankingProfile.from_json(p.to_json())
    assert q == p
    path = tmp_path / "sub" / "p.json"
    p.save(path)
    assert RankingProfile.load(path) == p
    assert json.loads(path.read_text())["order"] == p.order
    with pytest.raises(TradyError, match="invalid layer-ranking profile"):
        RankingProfile.from_json('{"model": "x"}')
    with pytest.raises(TradyError, match="JSON"):
        RankingProfile.from_json("{")
    with pytest.raises(TradyError, match="not found"):
        RankingProfile.load(tmp_path / "missing.json")


def test_check_layers_names_first_missing():
    p = make_profile([1.0, 2.0], names=["a", "b"])
    costs = CostTable([LayerInfo(n, "conv", 4, 1, (1, 1), 1, (1, 1), (1, 1)) for n in ["a", "x", "b"]], classifier="fc")
    with pytest.raises(TradyError, match="model layer 'x' is missing"):
        p.check_layers(costs)
    costs2 = CostTable([LayerInfo("a", "conv", 4, 1, (1, 1), 1, (1, 1), (1, 1))], classifier="fc")
    with pytest.raises(TradyError, match="profile layer 'b' is not in the model"):
        p.check_layers(costs2)


def test_for_costs_reweights_to_new_units():
    p = make_profile([10.0, 20.0], names=["a", "b"])  # space 3 + 7 = 10: norm sums 100, 200
    same = CostTable([LayerInfo(n, "conv", 4, 3, (1, 1), 1, (7, 1), (7, 1)) for n in "ab"], classifier="fc")
    assert p.for_costs(same) is p
    # a keeps weight 3 and gets activation 17 (space 20); b: weight 45, activation 5 (space 50)
    other = CostTable(
        [
            LayerInfo("a", "conv", 4, 3, (1, 1), 1, (17, 1), (17, 1)),
            LayerInfo("b", "conv", 4, 5, (3, 3), 1, (5, 1), (5, 1)),
        ],
        classifier="fc",
    )
    q = p.for_costs(other, resolution=64)
    assert q.by_name["a"].rgn == pytest.approx(100 / 20) and q.by_name["b"].rgn == pytest.approx(200 / 50)
    assert q.by_name["b"].lara == pytest.approx(40.0 / (4 * 50))
    assert q.resolution == 64 and q.extra["reweighted_from_resolution"] == 32
    assert p.by_name["a"].rgn == 10.0  # the original is untouched


def test_spearman_layer_order():
    a = make_profile([1.0, 2.0, 3.0, 4.0])
    b = make_profile([10.0, 20.0, 30.0, 40.0])
    c = make_profile([4.0, 3.0, 2.0, 1.0])
    assert ranking.spearman_layer_order(a, b) == pytest.approx(1.0)
    assert ranking.spearman_layer_order(a, c) == pytest.approx(-1.0)
    d = make_profile([1.0, 2.0, 3.0], names=["l0", "l1", "zz"])  # common: l0, l1
    assert ranking.spearman_layer_order(a, d) == pytest.approx(1.0)
    with pytest.raises(TradyError, match="at least 2"):
        ranking.spearman_layer_order(a, make_profile([1.0], names=["q"]))


def test_plot_profile(tmp_path):
    out = tmp_path / "p.png"
    plot_profile(make_profile([4.0, 30.0, 1.0, 50.0, 15.0]), out)
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def test_load_profile_unknown_model():
    with pytest.raises(TradyError, match="layer-ranking profile"):
        ranking.load_profile("no-such-model")


@pytest.mark.parametrize("name", ranking.shipped_profiles())
def test_shipped_profiles_match_their_models(name):
    from trady import models

    p = ranking.load_profile(name)
    assert p.model == name and p.dataset != "fashion-mnist"
    model = models.create(name, pretrained=False, num_classes=10)
    costs = analyze(model, example_input=models.example_input(name, p.resolution), classifier="classifier")
    p.check_layers(costs)
    assert p.for_costs(costs) is p  # recorded units are the model's at the profile's resolution
    assert 1 <= p.k() <= len(p.layers)


def test_compute_profile_and_cli(tmp_path):
    from trady.cli import rank

    parser = argparse.ArgumentParser()
    rank.register(parser.add_subparsers())
    out = tmp_path / "p.json"
    args = parser.parse_args(
        [
            "rank",
            "--model",
            "mcunet-in1",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--seed",
            "3",
            "--train-size",
            "40",
            "--resolution",
            "32",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "p.png"),
            "--no-progress",
        ]  # fmt: skip
    )
    assert args.func(args) == 0
    p = RankingProfile.load(out)
    assert p.model == "mcunet-in1" and p.resolution == 32 and p.dataset == "digits" and p.seed == 3
    assert p.iterations == 5 and len(p.layers) > 10
    assert all(lay.rgn > 0 for lay in p.layers[1:])
    assert (tmp_path / "p.png").exists()


def test_compute_profile_rejects_bad_settings():
    for kwargs, match in [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"threshold": 1.5}, "threshold")]:
        with pytest.raises(TradyError, match=match):
            rank_run.compute_profile("mcunet-in1", **kwargs)
