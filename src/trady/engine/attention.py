"""nn.MultiheadAttention whose projections are channel-sparse layers and whose attention keeps little.

Stock MultiheadAttention calls its projections functionally (F.linear on `in_proj_weight`, then on
`out_proj.weight`), so neither is a layer the engine could update by input feature. Prepared:
- the input projection is the layer named after the module itself (`in_proj_weight`, input features
  = embed_dim, outputs = 3 * embed_dim): ChannelSparseLinearFn, keeps only the selected input features;
- `out_proj` is a SparseLinear like any Linear (named `<module>.out_proj`);
- the attention itself goes through kept_tensors.attention (q, k, v kept at 8 bits or fp32, recomputed).
Self-attention only (query is key is value) with in_proj_weight, no bias_k/bias_v, no zero-attention,
need_weights=False on the backprop path; anything else raises.
"""

from __future__ import annotations

import torch
from torch import nn

from trady.core.errors import TradyError
from trady.engine import functions, kept_tensors
from trady.engine.modules import LayerState, current_slice, no_autocast


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """MultiheadAttention's masks (bool: True = not allowed; float: added) as one additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class SparseMultiheadAttention(nn.MultiheadAttention):
    trady: LayerState
    trady_mode: str = "int8"

    @property
    def weight(self) -> torch.Tensor:
        """The input projection is this layer's weight (what the engine slices by input feature)."""
        return self.in_proj_weight

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):  # fmt: skip
        st = self.trady
        w_slice = current_slice(self)
        out_slice = current_slice(self.out_proj) if hasattr(self.out_proj, "trady") else None
        trains = w_slice is not None or out_slice is not None or any(p.requires_grad for p in self.parameters())
        on_path = torch.is_grad_enabled() and (query.requires_grad or trains)
        self_attention = query is key and key is value and self._qkv_same_embed_dim
        supported = self_attention and self.bias_k is None and not self.add_zero_attn and not need_weights
        # Off the path, training mode still takes this path where it can: dropout draws the same random
        # numbers as on it (activation checkpointing recomputes a no-grad forward with grad).
        if not on_path and not (self.training and self.dropout > 0 and supported):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)  # fmt: skip
        no_autocast(query)
        if not self_attention:
            raise TradyError(
                f"MultiheadAttention {st.name!r} on the backprop path: only self-attention (query is key is "
                "value) with one in_proj_weight is supported"
            )
        if not supported:
            raise TradyError(
                f"MultiheadAttention {st.name!r} on the backprop path: accepted need_weights=False, "
                "add_bias_kv=False, add_zero_attn=False"
            )
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, e = x.shape
        h = self.num_heads
        qkv = functions.ChannelSparseLinearFn.apply(
            x, self.in_proj_weight.detach(), self.in_proj_bias, w_slice, st.idx, st.on_saved
        )
        q, k, v = (t.reshape(b, n, h, e // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        mask = _additive_mask(attn_mask, x.dtype)
        if mask is not None and mask.dim() == 3:  # [B * heads, L, S]
            mask = mask.view(b, h, n, n)
        if key_padding_mask is not None:
            pad = _additive_mask(key_padding_mask, x.dtype).view(b, 1, 1, n)
            mask = pad if mask is None else mask + pad
        causal = bool(is_causal) and mask is None
        dropout = self.dropout if self.training else 0.0
        out = kept_tensors.attention(q, k, v, mask, dropout, causal, None, self.trady_mode)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None
