"""Masked grouped-query attention without a copy of the keys and values per query head (``TRIPOD_CB_PACKED_GQA``).

Without flash attention, transformers' continuous batching runs SDPA over the whole batch as one sequence, with a
block-diagonal mask. With a mask on CUDA, transformers copies each key/value head once per query head that shares it
(``repeat_kv``: four times for the 1B model's 32 query heads on 8), since SDPA's grouped-query mode would fall back to
its slowest kernel there. At 64 streams the batch reads about 13,000 cached tokens a step: two copies of 53 MB per
layer. The fourth H100 run's profile has an unnamed elementwise kernel, two calls a layer, at 24 % of a step
(docs/BENCHMARKS.md).

Stacking each key/value head's query heads along the query axis gives the same attention without the copies: query
``[batch, heads, q, dim]`` becomes ``[batch, kv_heads, groups * q, dim]`` and the mask, shared by all heads, is
repeated ``groups`` times along its query axis (64 x 13,000 x 4 entries). This is transformers' own ``pack_gqa``,
which it applies to one query token, extended to many. On an H100 (fifth run, docs/BENCHMARKS.md) it took
``--direct`` at 64 streams from 3,148 to 3,557 tok/s and one stream through the server from 200 to 214, so it is on
by default on CUDA; ``TRIPOD_CB_PACKED_GQA=0`` turns it off.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def packed_gqa_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with grouped heads packed when a mask shared by all heads is given."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_length, _ = query.shape
    packable = (
        groups > 1
        and q_length > 1
        and attention_mask is not None
        and attention_mask.shape[1] == 1
        and not dropout
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    )
    if not packable:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    packed = query.reshape(batch, key.shape[1], groups * q_length, query.shape[-1])
    mask = attention_mask.repeat(1, 1, groups, 1)
    output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    output = output.reshape(batch, heads, q_length, value.shape[-1])
    return output.transpose(1, 2).contiguous(), None


def use_packed_gqa() -> None:
    """Route this process's SDPA attention (every model in it) through ``packed_gqa_sdpa``."""
    ALL_ATTENTION_FUNCTIONS["sdpa"] = packed_gqa_sdpa
