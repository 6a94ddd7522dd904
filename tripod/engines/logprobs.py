"""Token log-probabilities as OpenAI reports them: the model's own, from the raw logits.

They are the log-softmax of the logits before penalties, logit_bias, a grammar mask or temperature change them
(vLLM's default "raw" logprobs), so they say what the model thought, whatever the request did to its choice. The
engines pick them on their own thread (``pick_logprobs``, numbers only) and the reader turns them into
``TokenLogprob`` objects (``TokenTexts``), so text work stays off the batch.
"""

from __future__ import annotations

import threading

import torch

from tripod.engines.base import TokenLogprob

# One token's pick: (chosen id, its logprob, the top ids, their logprobs), highest first.
Pick = tuple[int, float, tuple[int, ...], tuple[float, ...]]


def pick_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, tops: list[int]) -> list[Pick]:
    """For each row of ``logprobs`` [rows, vocab]: the chosen token's logprob and the row's ``tops[i]`` best."""
    chosen_logprobs = logprobs.gather(1, chosen.view(-1, 1)).view(-1).tolist()
    widest = max(tops, default=0)
    if widest:
        best, best_ids = torch.topk(logprobs, widest, dim=-1, sorted=True)
        best, best_ids = best.tolist(), best_ids.tolist()
    picks = []
    for i, token in enumerate(chosen.tolist()):
        top = tops[i]
        ids = tuple(best_ids[i][:top]) if top else ()
        values = tuple(best[i][:top]) if top else ()
        picks.append((token, chosen_logprobs[i], ids, values))
    return picks


class TokenTexts:
    """Each token's text decoded alone and its raw bytes, cached: a byte token of a split character has its real byte.

    ``lltokenizer`` is llguidance's view of the tokenizer (``ModelGrammars.tokenizer``), which knows every token's
    bytes, byte-level BPE or not.
    """

    def __init__(self, tokenizer, lltokenizer) -> None:
        self.tokenizer = tokenizer
        self.lltokenizer = lltokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    def __getitem__(self, token: int) -> tuple[str, tuple[int, ...]]:
        entry = self._cache.get(token)
        if entry is None:
            text = self.tokenizer.decode([token])
            special = token >= self.lltokenizer.vocab_size or self.lltokenizer.is_special_token(token)
            raw = text.encode() if special else self.lltokenizer.decode_bytes([token])
            entry = (text, tuple(raw))
            with self._lock:
                self._cache[token] = entry
        return entry

    def token_logprob(self, pick: Pick) -> TokenLogprob:
        token, logprob, top_ids, top_logprobs = pick
        top = tuple((*self[t], lp) for t, lp in zip(top_ids, top_logprobs, strict=True))
        return TokenLogprob(*self[token], logprob=logprob, top=top)
