"""`trady.rank` on every model the engine accepts, then the Tuner (strategy trady) one step on that profile.

The table: the engine's CASES (tests/cases.py: convolutions of every shape, Linear on tokens, smooth
activations, squeeze-excitation, LayerNorm, nn.TransformerEncoderLayer's MultiheadAttention) and the
constructed modern networks (trady.models.constructed.SMALL). A MultiheadAttention's layer is its
input projection (`in_proj_weight`), as in the engine's cost table: its RGN is checked against the
per-input-feature norms of the dense gradient computed here by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trady
from cases import CASES, Case, TinyTransformer, _build
from trady.models import constructed

SMALL_CASES = [Case(fn, (2, 3, r, r)) for fn, r in constructed.SMALL.values()]
TABLE = CASES + SMALL_CASES


def _batches(case: Case, model: nn.Module, n: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n, *case.input_shape), generator=g)
    with torch.no_grad():
        classes = model.eval()(x[0]).shape[1]
    return [(x[i], torch.randint(classes, (case.input_shape[0],), generator=g)) for i in range(n)]


@pytest.mark.parametrize("case", TABLE, ids=[getattr(c.build, "__name__", str(c.build)) for c in TABLE])
def test_rank_then_one_tuner_step(case: Case) -> None:
    model, x = _build(case)
    batches = _batches(case, model)
    profile = trady.rank(model, batches, epochs=1)
    assert profile.layers and all(lay.rgn >= 0 for lay in profile.layers)
    assert sum(lay.rgn for lay in profile.layers) > 0

    tuner = trady.Tuner(model, x, strategy="trady", budget="30%", profile=profile, config=case.config)
    optimizer = torch.optim.SGD(tuner.start_epoch(1), lr=0.01)
    assert tuner.selection, "the draw selected nothing"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xb, yb = batches[0]
    F.cross_entropy(model(xb), yb).backward()
    optimizer.step()
    tuner.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the step changed nothing"
    tuner.restore()


def test_attention_rank_is_the_input_projection_gradient() -> None:
    """One step of lr -> 0 (the ranking's first step): the attention layer's accumulated channel norms are
    the per-input-feature norms of dL/d in_proj_weight of the dense model, computed here by autograd."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x, y = torch.randn(2, 7, 10), torch.tensor([1, 3])
    profile = trady.rank(model, [(x, y)], epochs=1)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name in ("block1.self_attn", "block2.self_attn"):
        grad = model.get_submodule(name).in_proj_weight.grad
        lay = profile.by_name[name]
        assert lay.kind == "linear" and lay.in_channels == grad.shape[1]
        expected = float((grad.double().norm(dim=0) / (lay.weight_units + lay.activation_units)).sum())
        assert lay.rgn == pytest.approx(expected, rel=1e-5)


def test_cli_ranks_a_vit_from_a_user_file(tmp_path) -> None:
    """`trady rank --model vit.py:build` (the issue's report): the attention layers are ranked too."""
    from helpers import cli
    from trady.selection.ranking import RankingProfile

    (tmp_path / "vit.py").write_text(
        "from trady.models.constructed import vit_like\n\n\ndef build(num_classes=10):\n"
        "    return vit_like(num_classes=num_classes, image=16).eval()\n"
    )
    out = tmp_path / "vit.json"
    assert cli(["rank", "--model", f"{tmp_path / 'vit.py'}:build", "--resolution", "16", "--epochs", "1",
                "--train-size", "16", "--batch-size", "8", "--out", out, "--no-progress"]) == 0  # fmt: skip
    profile = RankingProfile.load(out)
    attention = [lay for lay in profile.layers if lay.name.endswith("attn")]
    assert attention and all(lay.rgn > 0 for lay in attention)
