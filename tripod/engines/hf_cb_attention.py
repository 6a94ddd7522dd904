"""How a continuous batch attends: the key/value padding of captured steps, and grouped heads without copies.

transformers runs a continuous batch as one flattened sequence with a mask, and with a mask its SDPA path copies each
key/value head for every query head that shares it (``repeat_kv``). On CPU transformers is told to use SDPA's own
grouped mode; on CUDA, where that mode falls back to a slow kernel, ``grouped_attention`` packs the heads instead.
"""

from __future__ import annotations

import os

from tripod.patches.grouped_attention import use_packed_gqa

# With CUDA graphs, each step's attention reads the batch's cached tokens padded up to a multiple of this: transformers'
# own 16384 (0 asks for it) makes a short stream read many times what it holds; 1,024 costs more captured graphs.
KV_PADDING = 1024


def set_up_attention(*, on_gpu: bool, packed_gqa: bool, split_keys: int) -> bool:
    """Choose this process's attention for a continuous batch; True when packed grouped-query attention is on."""
    if not on_gpu:
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        return False  # on CPU, SDPA takes grouped heads with a mask itself (above)
    if packed_gqa:
        use_packed_gqa(split_keys)
    return packed_gqa
