"""Tokens -> chunks, the webui's rules (75 per chunk, BOS/EOS, padding, comma back-tracking, truncation)."""

import pytest
import torch

from lib_lora.backends import text as T
from lib_lora.errors import BadInput


def words(n, start=1000):
    return list(range(start, start + n))


@pytest.mark.parametrize("n, chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3), (225, 3)])
def test_chunk_counts_follow_75_token_steps(n, chunks):
    assert len(T.split_chunks(words(n), max_chunks=3)) == chunks
    assert T.needed_chunks(n) == chunks


def test_tokens_beyond_max_tokens_are_dropped():
    ids = T.chunk_ids([words(300)], max_tokens=225)
    assert ids.shape == (1, 3, 77)
    body = ids[0, :, 1:76].reshape(-1).tolist()
    assert body == words(225)  # exactly the first 225 tokens, in order
    assert T.chunk_ids([words(300)], max_tokens=75).shape == (1, 1, 77)


def test_chunk_layout_clip_pads_with_eos_openclip_with_zero():
    clip = T.chunk_ids([[320, 1125]], max_tokens=75)[0, 0].tolist()
    assert clip[:4] == [T.BOS_ID, 320, 1125, T.EOS_ID] and set(clip[4:]) == {T.EOS_ID} and len(clip) == 77
    oc = T.chunk_ids([[320, 1125]], max_tokens=75, pad_id=0)[0, 0].tolist()
    assert oc[:4] == [T.BOS_ID, 320, 1125, T.EOS_ID] and set(oc[4:]) == {0}


def test_batch_gets_the_longest_captions_chunk_count_with_empty_chunks():
    ids = T.chunk_ids([words(3), words(100)], max_tokens=225)
    assert ids.shape == (2, 2, 77)
    empty = ids[0, 1].tolist()
    assert empty == [T.BOS_ID] + [T.EOS_ID] * 76
    assert T.chunk_ids([words(3)], max_tokens=225, pad_chunks=True).shape == (1, 3, 77)
    oc_empty = T.chunk_ids([words(3), words(100)], max_tokens=150, pad_id=0)[0, 1].tolist()
    assert oc_empty == [T.BOS_ID, T.EOS_ID] + [0] * 75


def test_comma_backtrack_moves_the_words_after_a_late_comma():
    tokens = words(70) + [T.COMMA_ID] + words(10, start=5000)
    chunks = T.split_chunks(tokens, max_chunks=2)
    assert chunks[0] == words(70) + [T.COMMA_ID]  # the chunk ends at the comma ...
    assert chunks[1] == words(10, start=5000)  # ... and the words after it start the next one
    plain = T.split_chunks(tokens, max_chunks=2, comma_backtrack=0)
    assert len(plain[0]) == 75 and plain[1] == words(6, start=5004)
    far = words(40) + [T.COMMA_ID] + words(40, start=5000)  # comma 34 tokens back: beyond 20, no move
    assert len(T.split_chunks(far, max_chunks=2)[0]) == 75


def test_max_tokens_must_be_a_chunk_multiple():
    with pytest.raises(BadInput, match="75, 150 or 225"):
        T.chunk_ids([[1]], max_tokens=100)


def test_join_chunks_puts_chunk_outputs_side_by_side():
    states = torch.arange(2 * 3 * 77 * 2, dtype=torch.float32).reshape(6, 77, 2)  # (B*k, 77, D) with B=2, k=3
    joined = T.join_chunks(states, 2)
    assert joined.shape == (2, 231, 2)
    assert torch.equal(joined[1, 77:154], states[4])
