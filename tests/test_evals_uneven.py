"""The text eval on a short corpus: every rank runs the same number of forwards (under ZeRO-3 a
forward is a collective; one rank with a forward more waits forever), and a corpus too short for
one chunk per rank stops with the keys to change."""
from __future__ import annotations

import pytest

from evip.evals import text_batches


class Words:
    """A tokenizer stand-in: one id per word."""
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_short_corpus_gives_every_rank_the_same_number_of_batches(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(["word"] * 45))                    # 5 chunks of 8 (and a rest)
    for world, n, expected in ((2, 10, 2), (3, 10, 1), (2, 1, 1), (4, 10, 1)):
        counts = [len(list(text_batches(Words(), None, str(corpus), 8, n, r, world))) for r in range(world)]
        assert counts == [expected] * world, (world, n, counts)
    with pytest.raises(ValueError, match="eval.text_seq_len=8 chunk per rank"):
        list(text_batches(Words(), None, str(corpus), 8, 10, 0, 6))
