"""Analytic costs by hand: per-channel units and FLOPs, sparsities, budgets, the paper's accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trady.core.errors import TradyError
from trady.engine.costs import CostTable, LayerInfo, analyze, bytes_per_slot, parse_budget

# ---------------------------------------------------------------------------------------------
# Per input channel: C^W = C' kh kw / g, C^A = H W (input), FLOPs = kh kw C' H' W' / g
# ---------------------------------------------------------------------------------------------


def _one_layer(layer: nn.Module, in_shape: tuple[int, ...]) -> LayerInfo:
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(in_shape))
    table = analyze(model, in_shape)
    assert table.classifier == "2" and table.names == ["0"]
    return table.layers[0]


@pytest.mark.parametrize(
    ("layer", "in_shape", "kind", "w", "a", "flops", "out_hw"),
    [
        # conv 8 -> 12, 3x3, stride 2, pad 1 on 10x14: out 5x7; W = 12*9, A = 140, F = 9*12*35
        (nn.Conv2d(8, 12, 3, stride=2, padding=1), (1, 8, 10, 14), "conv", 108, 140, 3780, (5, 7)),
        # depthwise 8, 3x3 on 10x14 (same size out): W = 9, F = 9*140
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 10, 14), "depthwise", 9, 140, 1260, (10, 14)),
        # depthwise with multiplier 2: a channel owns 2 filters
        (nn.Conv2d(8, 16, 3, padding=1, groups=8), (1, 8, 10, 14), "depthwise", 18, 140, 2520, (10, 14)),
        # grouped conv 8 -> 16, groups 4: a channel meets the 4 outputs of its group
        (nn.Conv2d(8, 16, 3, padding=1, groups=4), (1, 8, 10, 14), "conv", 36, 140, 5040, (10, 14)),
        # dilation 2, no padding on 10x14: out 6x10
        (nn.Conv2d(4, 5, 3, dilation=2), (1, 4, 10, 14), "conv", 45, 140, 2700, (6, 10)),
        # 1x1
        (nn.Conv2d(6, 4, 1), (1, 6, 5, 5), "conv", 4, 25, 100, (5, 5)),
        # linear on [B, F]: W = out, A = 1, F = out
        (nn.Linear(10, 6), (1, 10), "linear", 6, 1, 6, (1, 1)),
        # linear on [B, T, F] tokens: A = T, F = out * T
        (nn.Linear(10, 6), (1, 7, 10), "linear", 6, 7, 42, (7, 1)),
    ],
)
def test_per_channel_units_and_flops(layer, in_shape, kind, w, a, flops, out_hw) -> None:
    info = _one_layer(layer, in_shape)
    assert info.kind == kind
    assert info.weight_units_per_channel == w
    assert info.activation_units_per_channel == a
    assert info.space_units_per_channel == w + a
    assert info.flops_per_channel == flops
    assert info.output_hw == out_hw
    assert info.full_units == info.in_channels * (w + a)


def test_layer_info_records_geometry() -> None:
    info = _one_layer(nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)), (1, 4, 9, 8))
    assert info.kernel_size == (3, 5) and info.stride == (2, 1) and info.padding == (1, 2)
    assert info.input_hw == (9, 8) and info.output_hw == (5, 8)
    same = _one_layer(nn.Conv2d(4, 6, 3, padding="same", dilation=2), (1, 4, 9, 8))
    assert same.padding == (2, 2) and same.output_hw == (9, 8)
    d = same.as_dict()
    assert d["weight_units_per_channel"] == 54 and d["activation_units_per_channel"] == 72


# ---------------------------------------------------------------------------------------------
# A toy model: totals, a selection's units, bytes and sparsities by hand
# ---------------------------------------------------------------------------------------------


def toy_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # "0": 8x8 in; W 36, A 64, F 9*4*64 = 2304; 3 ch
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),  # "2": depthwise, 8x8 -> 4x4; W 9, A 64, F 144
        nn.ReLU(),
        nn.Conv2d(4, 6, 1),  # "4": 4x4; W 6, A 16, F 96; 4 ch
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),  # classifier: outside the table
    )


@pytest.fixture
def toy() -> CostTable:
    return analyze(toy_model(), (1, 3, 8, 8))


def test_toy_totals(toy: CostTable) -> None:
    assert toy.names == ["0", "2", "4"] and toy.classifier == "7"
    assert [lay.kind for lay in toy.layers] == ["conv", "depthwise", "conv"]
    assert toy.full_weight_units == 3 * 36 + 4 * 9 + 4 * 6 == 168
    assert toy.full_activation_units == 3 * 64 + 4 * 64 + 4 * 16 == 512
    assert toy.full_units == 680
    assert toy.full_flops == 3 * 2304 + 4 * 144 + 4 * 96 == 7872
    assert toy.min_channel_units == 22
    assert sum(len(v) for v in toy.all_channels().values()) == 11
    assert toy.selection_units(toy.all_channels()) == toy.full_units


def test_toy_selection_metrics(toy: CostTable) -> None:
    sel = toy.check_selection({"0": [1], "4": [3, 0]})
    assert {k: v.tolist() for k, v in sel.items()} == {"0": [1], "4": [0, 3]}  # sorted
    with pytest.raises(TradyError, match=r"channel indices of layer '4' repeat \[3\]"):  # a repeat is a mistake
        toy.check_selection({"4": [3, 0, 3]})
    assert toy.selection_weight_units(sel) == 36 + 2 * 6 == 48
    assert toy.selection_activation_units(sel) == 64 + 2 * 16 == 96
    assert toy.selection_units(sel) == 144
    assert toy.selection_bytes(sel) == 4 * 144
    assert toy.selection_bytes(sel, batch_size=4) == 4 * (48 + 4 * 96)
    assert toy.selection_bytes(sel, batch_size=4, precision="int8") == 48 + 4 * 96
    sp = toy.sparsity(sel)
    assert sp["activation_sparsity"] == pytest.approx(1 - 96 / 512)
    assert sp["weight_sparsity"] == pytest.approx(1 - 48 / 168)
    assert sp["flops_reduction"] == pytest.approx(1 - (2304 + 2 * 96) / 7872)
    assert toy.sparsity({}) == {"activation_sparsity": 1.0, "weight_sparsity": 1.0, "flops_reduction": 1.0}
    full = toy.sparsity(toy.all_channels())
    assert all(v == pytest.approx(0.0) for v in full.values())


def test_as_dict(toy: CostTable) -> None:
    d = toy.as_dict()
    assert d["full_units"] == 680 and d["classifier"] == "7" and len(d["layers"]) == 3
    assert d["layers"][1]["kind"] == "depthwise" and d["layers"][1]["flops_per_channel"] == 144


def test_selection_errors(toy: CostTable) -> None:
    with pytest.raises(TradyError, match=r"unknown layer '5'.*accepted: 0, 2, 4"):
        toy.check_selection({"5": [0]})
    with pytest.raises(TradyError, match=r"channel 3 out of range for layer '0': accepted 0\.\.2"):
        toy.check_selection({"0": [0, 3]})
    with pytest.raises(TradyError, match=r"channel -1 out of range for layer '4': accepted 0\.\.3"):
        toy.check_selection({"4": [-1]})
    with pytest.raises(TradyError, match=r"'7' is the classifier"):
        toy.check_selection({"7": [0]})
    with pytest.raises(TradyError, match="integers"):
        toy.check_selection({"0": [0.5]})
    assert toy.check_selection({"0": []}) == {}


def test_analyze_errors() -> None:
    with pytest.raises(TradyError, match="input_shape"):
        analyze(toy_model())
    with pytest.raises(TradyError, match=r"unknown classifier layer 'x'"):
        analyze(toy_model(), (1, 3, 8, 8), classifier="x")
    with pytest.raises(TradyError, match="no Conv2d or Linear"):
        analyze(nn.Sequential(nn.ReLU()), (1, 3))
    with pytest.raises(TradyError, match="precision"):
        bytes_per_slot("fp8")


def test_analyze_keeps_train_mode_and_rejects_shared_layers() -> None:
    model = toy_model().train()
    analyze(model, (1, 3, 8, 8))
    assert model.training
    lin = nn.Linear(4, 4)
    with pytest.raises(TradyError, match="more than once"):
        analyze(nn.Sequential(lin, lin, nn.Linear(4, 2)), (1, 4))


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kwargs", "units"),
    [
        ("27946", {}, 27946),
        (27946, {}, 27946),
        (" 27946 ", {}, 27946),
        ("27946units", {}, 27946),
        ("50%", {}, 340),
        ("2.2%", {}, 14),  # floor(680 * 2.2 / 100) = floor(14.96)
        ("256KB", {}, 64000),  # batch 1, fp32: bytes / 4 (units per byte of full fine-tuning)
        ("100KB", {}, 25000),
        ("1.5MiB", {}, 393216),
        ("3kib", {}, 768),
        ("256KB", {"precision": "int8"}, 256000),
        # batch 4: 256000 B / (4 * (168 + 4 * 512)) B * 680 units = 19638.99...
        ("256KB", {"batch_size": 4}, 19638),
    ],
)
def test_parse_budget(toy: CostTable, spec, kwargs, units) -> None:
    assert parse_budget(spec, toy, **kwargs) == units


def test_parse_budget_paper_share() -> None:
    table = CostTable([LayerInfo("a", "conv", 1, 1, (1, 1), 1, (1, 1252319), (1, 1))], "fc")
    assert table.full_units == 1252320  # MbV2-w0.35 full fine-tuning
    assert parse_budget("2.2%", table) == 27551
    assert parse_budget(f"{100 * 27946 / 1252320}%", table) in (27945, 27946)


@pytest.mark.parametrize("bad", ["abc", "-5", "12XB", "0", "", "1.2.3", "5 %%", "nan"])
def test_parse_budget_rejects(toy: CostTable, bad: str) -> None:
    with pytest.raises(TradyError) as err:
        parse_budget(bad, toy)
    msg = str(err.value)
    assert repr(bad) in msg or repr(bad.lower()) in msg
    assert "accepted" in msg and "27946" in msg and "256KB" in msg and "2.2%" in msg


@pytest.mark.parametrize("bad", [True, -1, 0, float("inf")])
def test_parse_budget_rejects_numbers(toy: CostTable, bad) -> None:
    with pytest.raises(TradyError, match="accepted"):
        parse_budget(bad, toy)


# ---------------------------------------------------------------------------------------------
# The paper's accounting on its own three models (128 px)
# ---------------------------------------------------------------------------------------------



def _mcu_table(name: str):
    from trady import models

    model = models.create(name, pretrained=True)  # the MCU files from ../shared/models/mcu
    return model, analyze(model, (1, 3, 128, 128))


def test_mcunet_full_units_match_the_paper() -> None:
    _, table = _mcu_table("mcunet-in1")
    assert table.full_units == 1_309_808
    assert table.classifier == "classifier"
    # the paper's budget is 1.2% of it
    assert 15_936 / table.full_units == pytest.approx(0.0122, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "paper_units", "mix_channels"),
    [("mbv2-w0.35", 1_252_320, 448), ("proxyless-w0.3", 1_162_032, 384)],
)
def test_mcu_full_units_plus_omitted_feature_mix(name: str, paper_units: int, mix_channels: int) -> None:
    """The paper counts a 1x1 conv C -> mix_channels at 4x4 that the int8 files omit."""
    model, table = _mcu_table(name)
    c = model.classifier.in_features  # the last block's output feeds the (omitted) feature-mix conv
    last = table.layers[-1]
    assert last.out_channels == c and last.output_hw == (4, 4)
    feature_mix = c * (mix_channels * 1 * 1 // 1 + 4 * 4)  # C^W + C^A per input channel, times C
    assert table.full_units + feature_mix == paper_units
    assert c == {"mbv2-w0.35": 112, "proxyless-w0.3": 96}[name]
