"""The decode loop's helpers: the windowed incremental detokenizer equals decoding the whole answer."""

import random

from model.generation import IncrementalDetokenizer


def test_windowed_detokenizer_concatenates_to_the_full_decode(lm):
    tok = lm.tokenizer
    rng = random.Random(0)
    texts = ["héllo wörld 你好 🎉🎉 naïve café — ok", "a\nb  c\t\td", "日本語のテキストと emoji 👩‍👩‍👧"]
    cases = [tok(t, add_special_tokens=False)["input_ids"] * 2 for t in texts]
    cases += [[rng.randrange(0, 151000) for _ in range(60)] for _ in range(50)]  # random ids, split bytes
    cases.append(tok("<|im_start|>x<|im_end|>y", add_special_tokens=False)["input_ids"])  # specials skipped
    for n, ids in enumerate(cases):
        d = IncrementalDetokenizer(tok)
        deltas = [d.push(i) for i in ids]
        if n < len(texts):  # real text: never half a character in a delta
            assert all("\ufffd" not in x for x in deltas)
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) in (full, full.rstrip("\ufffd"))
