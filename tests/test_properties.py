"""Property-based tests (hypothesis) of the budget parser and of select()'s channel indices: every input
either gives the value the rule says, computed here by hand with exact fractions, or one line naming it."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trady.core.errors import TradyError
from trady.engine.costs import _BYTE_UNITS, analyze, bytes_per_slot, parse_budget

# deterministic (derandomize: the same examples on every machine and run) and a few seconds at most
PROPERTY = settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def toy_table():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, padding=1, groups=2),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 2),
    )  # fmt: skip
    return model, analyze(model, (1, 3, 8, 8))


MODEL, TABLE = toy_table()
LAYERS = {lay.name: lay.in_channels for lay in TABLE.layers}

decimals = st.decimals(min_value="0.001", max_value="1e6", places=3, allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.integers(1, 10**9).map(str), decimals.map(lambda d: f"{d:f}"))


@PROPERTY
@given(value=numbers, unit=st.sampled_from(["", "u", "units", "%", *_BYTE_UNITS, "KB", "MiB"]),
       space=st.sampled_from(["", " "]), batch=st.integers(1, 64))  # fmt: skip
def test_a_well_formed_budget_parses_to_the_rule(value, unit, space, batch):
    spec = f"{value}{space}{unit}"
    amount = Fraction(value)
    if amount <= 0:
        with pytest.raises(TradyError, match="must be positive"):
            parse_budget(spec, TABLE, batch_size=batch)
        return
    got = parse_budget(spec, TABLE, batch_size=batch)
    key = unit.lower()
    if key in ("", "u", "units"):
        want = math.floor(amount)
    elif key == "%":
        want = math.floor(TABLE.full_units * amount / 100)
    else:
        full_bytes = bytes_per_slot("fp32") * (TABLE.full_weight_units + batch * TABLE.full_activation_units)
        want = math.floor(amount * _BYTE_UNITS[key] * TABLE.full_units / full_bytes)
    assert got == want and isinstance(got, int)


@PROPERTY
@given(spec=st.text(max_size=12))
def test_any_other_text_is_a_budget_or_one_line_naming_it(spec):
    try:
        got = parse_budget(spec, TABLE)
    except TradyError as err:
        text = str(err)
        assert "\n" not in text and repr(spec) in text and "accepted: units" in text
        return
    assert isinstance(got, int) and got >= 0


@PROPERTY
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6), st.booleans()))
def test_numeric_budgets(value):
    bad = isinstance(value, bool) or not math.isfinite(value) or value <= 0
    if bad:
        with pytest.raises(TradyError, match="invalid budget"):
            parse_budget(value, TABLE)
    else:
        assert parse_budget(value, TABLE) == math.floor(Fraction(value))


index_values = st.integers(-12, 12)
index_lists = st.lists(index_values, max_size=8)
containers = st.sampled_from(["list", "tuple", "tensor", "int32 tensor"])


def as_container(values: list, kind: str):
    if kind == "list":
        return list(values)
    if kind == "tuple":
        return tuple(values)
    return torch.tensor(values, dtype=torch.int32 if kind == "int32 tensor" else torch.int64)


@pytest.fixture(scope="module")
def engine():
    from trady.engine import SparseEngine

    eng = SparseEngine(MODEL, torch.zeros(1, 3, 8, 8))
    yield eng
    eng.restore()


@PROPERTY
@given(layer=st.sampled_from(sorted(LAYERS)), values=index_lists, kind=containers)
def test_select_takes_distinct_in_range_ints_and_names_anything_else(engine, layer, values, kind):
    channels = LAYERS[layer]
    try:
        got = engine.select({layer: as_container(values, kind)})
    except TradyError as err:
        text = str(err)
        assert "\n" not in text and repr(layer) in text
        out_of_range = [v for v in values if not 0 <= v < channels]
        repeated = len(set(values)) != len(values)
        assert out_of_range or repeated, text  # refused only for a reason
        if repeated and not out_of_range:
            assert "repeat" in text
        elif out_of_range and not repeated:
            assert "out of range" in text and f"accepted 0..{channels - 1}" in text
        return
    assert all(0 <= v < channels for v in values) and len(set(values)) == len(values)
    want = sorted(values)
    if want:
        assert got[layer].tolist() == want and got[layer].dtype == torch.int64
    else:
        assert layer not in got


@PROPERTY
@given(layer=st.sampled_from(sorted(LAYERS)), values=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=4),
       as_tensor=st.booleans())  # fmt: skip
def test_float_indices_are_refused_even_when_whole(engine, layer, values, as_tensor):
    before = {k: v.clone() for k, v in engine.selection.items()}
    with pytest.raises(TradyError, match=f"channel indices of layer '{layer}' must be integers"):
        engine.select({layer: torch.tensor(values) if as_tensor else values})
    assert {k: v.tolist() for k, v in engine.selection.items()} == {k: v.tolist() for k, v in before.items()}
