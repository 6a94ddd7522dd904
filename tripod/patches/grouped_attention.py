"""Masked grouped-query attention without a copy of the keys and values per query head (``TRIPOD_CB_PACKED_GQA``).

With a mask on CUDA, transformers' SDPA path copies each key/value head once per query head that shares it; stacking
each key/value head's query heads along the query axis gives the same attention without the copies. Opt-in split keys
(``TRIPOD_CB_SPLIT_KEYS=N``) also cut the keys into chunks run as one batch (docs/architecture.md, "Why each patch").
"""

from __future__ import annotations

import logging

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"transformers": "==5.24.0"}

logger = logging.getLogger(__name__)

# Keys per chunk when splitting the keys (0: no split); set by use_packed_gqa.
_split_keys = 0


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output ``[batch, heads, q, dim]`` and the log-sum-exp of each query row's scores ``[batch, heads, q]``.

    PyTorch's public SDPA does not return the log-sum-exp; its kernels do. On CUDA: the memory-efficient kernel,
    which takes strided inputs but, unlike the public SDPA, a mask of exactly ``[batch, heads, q, k]`` (a broadcast
    view of it is free); on CPU: the flash kernel, for the tests.
    """
    batch, heads, q_length, _ = query.shape
    mask = mask.expand(batch, heads, q_length, key.shape[2])
    output, lse = _kernel_with_lse(query, key, value, mask, scale)
    return output, lse[..., :q_length]


def _kernel_with_lse(query, key, value, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    if query.is_cuda:
        output, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, mask, True, 0.0, False, scale=scale
        )
        return output, lse
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=mask, scale=scale
    )


def split_keys_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float | None, chunk: int
) -> torch.Tensor:
    """Masked attention of one sequence (batch 1) with its keys cut into chunks of ``chunk``, as one batch.

    ``query`` ``[1, heads, q, dim]``, ``key``/``value`` ``[1, heads, k, dim]``, ``mask`` ``[1, 1, q, k]`` shared by
    the heads. The whole chunks become the kernel's head axis and the heads its batch axis; the query and mask are
    broadcast over them, not copied. The keys left over (transformers pads the keys to a multiple of 1,024 plus the
    padded query length) take one more call.

    Why: a flash-attention kernel parallelises over heads and query tiles only, so a batch with few key/value heads
    gives a GPU few blocks of work, each reading every key; chunks multiply the blocks. Each chunk's log-sum-exp weighs
    its output into the whole softmax (flash-decoding's combination); a row whose chunk is all masked weighs 0 there.
    """
    _, heads, q_length, dim = query.shape
    chunks, left = divmod(key.shape[2], chunk)
    whole = chunks * chunk
    queries = query[0].unsqueeze(1).expand(heads, chunks, q_length, dim)
    keys = key[0, :, :whole].unflatten(1, (chunks, chunk))
    values = value[0, :, :whole].unflatten(1, (chunks, chunk))
    masks = mask[0, 0, :, :whole].unflatten(1, (chunks, chunk)).transpose(0, 1).unsqueeze(0).expand(heads, -1, -1, -1)
    outputs, lse = attention_with_lse(queries, keys, values, masks, scale)  # [heads, chunks, q, dim], [.., q]
    if left:
        tail, tail_lse = attention_with_lse(query, key[:, :, whole:], value[:, :, whole:], mask[..., whole:], scale)
        outputs = torch.cat([outputs, tail.transpose(0, 1)], 1)
        lse = torch.cat([lse, tail_lse.transpose(0, 1)], 1)
    weights = (lse - lse.amax(1, keepdim=True)).exp().nan_to_num_(0.0)  # a row masked everywhere: nan -> 0
    total = weights.sum(1).clamp_min_(torch.finfo(weights.dtype).tiny)
    merged = (outputs.float().nan_to_num_(0.0) * weights.unsqueeze(-1)).sum(1) / total.unsqueeze(-1)
    return merged.to(query.dtype).unsqueeze(0)


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
    global _split_keys
    split = _split_keys if batch == 1 and key.shape[2] >= 2 * _split_keys else 0
    try:
        output = packed_attention(query, key, value, attention_mask, scaling, split)
    except RuntimeError as error:
        if not split:
            raise
        # The kernel's checks raise on the host, so whole-key SDPA can still take the step (what the split
        # launched before is wasted, not wrong); the process stops splitting.
        logger.warning("split keys turned off: the attention kernel refused them (%s)", error)
        _split_keys = 0
        output = packed_attention(query, key, value, attention_mask, scaling)
    return output.transpose(1, 2).contiguous(), None


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None,
    split_keys: int = 0,
) -> torch.Tensor:
    """Masked grouped-query attention, ``[batch, heads, q, dim]`` in and out, each key/value head's query heads
    stacked along the query axis and the mask (shared by all heads) repeated to match; with ``split_keys``, the keys
    in chunks of that many (``split_keys_sdpa``, batch 1)."""
    batch, heads, q_length, dim = query.shape
    groups = heads // key.shape[1]
    packed = query.reshape(batch, key.shape[1], groups * q_length, dim)
    mask = mask.repeat(1, 1, groups, 1)
    if split_keys:
        output = split_keys_sdpa(packed, key, value, mask, scale, split_keys)
    else:
        output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scale)
    return output.reshape(batch, heads, q_length, value.shape[-1])


def use_packed_gqa(split_keys: int = 0) -> None:
    """Route this process's SDPA attention (every model in it) through ``packed_gqa_sdpa``; ``split_keys`` > 0
    cuts a masked step's keys into chunks of that many when it has two chunks' worth (``split_keys_sdpa``)."""
    global _split_keys
    _split_keys = split_keys
    ALL_ATTENTION_FUNCTIONS["sdpa"] = packed_gqa_sdpa
