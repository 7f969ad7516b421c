"""select() arguments the engine refuses: unknown layer names, channels out of range, channel indices of
another form.
"""

from __future__ import annotations

import pytest
import torch

from cases import Case, Chain, _build, conv3x3
from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine


def test_unknown_layer_name_suggests_the_closest() -> None:
    model = Chain()
    engine = SparseEngine(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(TradyError) as err:
        engine.select({"b3.O": [0]})
    assert "'b3.O'" in str(err.value) and "b3.0" in str(err.value)
    with pytest.raises(TradyError, match="classifier"):
        SparseEngine(Chain(), torch.randn(1, 3, 8, 8), EngineConfig(classifier="clasifier"))


@pytest.mark.parametrize("bad", [8, -1, 100])
def test_out_of_range_channel_names_layer_and_range(bad: int) -> None:
    model = Chain()
    engine = SparseEngine(model, torch.randn(1, 3, 8, 8))
    engine.select({"b1.0": [0, 1]})
    with pytest.raises(TradyError) as err:
        engine.select({"b1.0": [0, bad]})
    msg = str(err.value)
    assert str(bad) in msg and "'b1.0'" in msg and "0..7" in msg
    # a failed select leaves the previous selection in place
    assert set(engine.selection) == {"b1.0"} and engine.layers["b1.0"].trady.w_slice is not None


@pytest.mark.parametrize("bad", [{0, 1}, "01", 3, [0, "1"]])
def test_channel_indices_of_another_form_raise(bad) -> None:
    model, x = _build(Case(conv3x3))
    engine = SparseEngine(model, x)
    with pytest.raises(TradyError, match=r"'3'.*accepted: .*list, tuple or range of ints, or an integer tensor"):
        engine.select({"3": bad})
    assert engine.select({"3": range(2)})["3"].tolist() == [0, 1]
