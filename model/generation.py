"""Token sampling and incremental detokenization for the session's decode loop."""

from __future__ import annotations

import torch

from .sampling import Sampling


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits ``(V,)``: greedy, or sampled with top-k / top-p."""
    if not sampling.do_sample:
        return int(torch.argmax(logits))
    top_k, top_p = sampling.top_k, sampling.top_p
    logits = logits.float() / max(sampling.temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Each step decodes only a short window (the tokens since the last emitted text plus a few
    before them, for context), not the whole answer, so a token costs the same at any length."""

    def __init__(self, tokenizer: object):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix: self._read], skip_special_tokens=True)
        text = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # nothing visible yet, or an incomplete multi-byte character: wait for the next token
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]
