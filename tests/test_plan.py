"""`trady plan`: the per-layer cost table and its JSON interface, run through `trady.cli.main`."""

from __future__ import annotations

import json

import pytest

from trady import cli
from trady.models.mcu import default_mcu_dir

MCU_DIR = str(default_mcu_dir())  # ../shared/models/mcu beside the repository
LAYER_KEYS = {
    "name",
    "kind",
    "in_channels",
    "out_channels",
    "kernel_size",
    "groups",
    "input_hw",
    "weight_units_per_channel",
    "activation_units_per_channel",
    "flops_per_channel",
}


REGISTERED = list(cli.COMMAND_MODULES)  # as shipped, before the fixture below


def test_plan_is_a_registered_command() -> None:
    assert "plan" in REGISTERED, "add 'plan' to trady.cli.COMMAND_MODULES"


@pytest.fixture(autouse=True)
def _plan_registered(monkeypatch):
    """The tests below exercise the command itself, registered or not (the test above checks that)."""
    if "plan" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "plan"])


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_mcunet_json_matches_the_paper(capsys) -> None:
    p = _json(capsys, "--model", "mcunet-in1", "--resolution", "128", "--mcu-dir", MCU_DIR)
    assert p["model"] == "mcunet-in1" and p["resolution"] == 128
    assert p["full_units"] == 1_309_808
    assert "budget_units" not in p
    layers = p["layers"]
    assert len(layers) == 42
    for lay in layers:
        assert LAYER_KEYS <= set(lay), set(lay) ^ LAYER_KEYS
    first = {k: layers[0][k] for k in LAYER_KEYS}
    assert first == {
        "name": "first_conv.conv",
        "kind": "conv",
        "in_channels": 3,
        "out_channels": 16,
        "kernel_size": [3, 3],
        "groups": 1,
        "input_hw": [128, 128],
        "weight_units_per_channel": 16 * 3 * 3,
        "activation_units_per_channel": 128 * 128,
        "flops_per_channel": 3 * 3 * 16 * 64 * 64,
    }
    total = sum(
        lay["in_channels"] * (lay["weight_units_per_channel"] + lay["activation_units_per_channel"]) for lay in layers
    )
    assert total == p["full_units"]
    dw = [lay for lay in layers if lay["kind"] == "depthwise"]
    assert dw and all(lay["groups"] == lay["in_channels"] for lay in dw)
    for lay in dw:  # MCUNet mixes 3x3, 5x5 and 7x7 depthwise kernels
        kh, kw = lay["kernel_size"]
        assert lay["weight_units_per_channel"] == kh * kw * lay["out_channels"] // lay["groups"]
    assert {tuple(lay["kernel_size"]) for lay in dw} == {(3, 3), (5, 5), (7, 7)}


@pytest.mark.parametrize(
    ("budget", "units"),
    [("15936", 15_936), ("1.2%", 15_717), ("256KB", 64_000)],  # 1.2% of 1,309,808 = 15,717.7
)
def test_budget(capsys, budget: str, units: int) -> None:
    p = _json(capsys, "--model", "mcunet-in1", "--budget", budget, "--batch-size", "8", "--mcu-dir", MCU_DIR)
    assert p["resolution"] == 128  # the model's own by default
    assert p["budget_units"] == units
    assert p["budget_fraction"] == pytest.approx(units / 1_309_808)
    assert p["budget_bytes_fp32"]["batch_1"] == 4 * units
    w, a = p["full_weight_units"], p["full_activation_units"]
    assert w + a == p["full_units"]
    assert p["budget_bytes_fp32"]["batch_8"] == round(4 * units / p["full_units"] * (w + 8 * a))
    assert p["full_bytes_fp32"] == {"batch_1": 4 * (w + a), "batch_8": 4 * (w + 8 * a)}


def test_table(capsys) -> None:
    code, out, err = _run(capsys, "--model", "mcunet-in1", "--budget", "15936", "--mcu-dir", MCU_DIR)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("name"))
    for col in ("kind", "C'", "groups", "input HxW", "W units/ch", "A units/ch", "FLOPs/ch", "full units"):
        assert col in header
    assert "first_conv.conv" in out and "blocks.13.pointwise2.conv" in out
    assert "1,309,808 units" in out
    assert "15,936 units" in out and "1.22% of full fine-tuning" in out
    row = next(line for line in out.splitlines() if line.startswith("first_conv.conv")).split()
    assert row[1:] == ["conv", "3", "16", "3x3", "1", "128x128", "144", "16,384", "589,824", "49,584"]


def test_other_zoo_model_at_small_resolution(capsys) -> None:
    p = _json(capsys, "--model", "mobilenet_v2", "--resolution", "64")
    assert p["resolution"] == 64 and len(p["layers"]) == 52
    assert p["layers"][0]["input_hw"] == [64, 64]
    assert p["layers"][-1]["input_hw"] == [2, 2]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "mcunet-in2"], "mcunet-in1"),
        (["--model", "mcunet-in1", "--budget", "12XB"], "12XB"),
        (["--model", "mcunet-in1", "--budget", "-5"], "accepted"),
        (["--model", "mcunet-in1", "--resolution", "0"], "resolution"),
        (["--model", "mcunet-in1", "--batch-size", "0"], "batch size"),
    ],
)
def test_errors_are_one_clear_line(capsys, argv: list[str], needle: str) -> None:
    code, out, err = _run(capsys, *argv, "--mcu-dir", MCU_DIR)
    assert code == 2 and out == ""
    assert err.startswith("trady: error: ") and err.count("\n") == 1
    assert needle in err


def test_micro_batch_without_a_budget_is_refused_and_the_help_names_the_prediction(capsys) -> None:
    code, _, err = _run(capsys, "--model", "mbv2-w0.35", "--resolution", "32", "--micro-batch", "4")
    assert code == 2 and "--micro-batch 4 needs --budget" in err
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "predicted step peak" in text and "step-time floor" in text and "(needs --budget)" in text
