"""Captions -> token chunks -> text-encoder states, the way the webui encodes prompts at generation time.

Why the webui's way: a LoRA is used in the webui, so training should see captions exactly as generation sees
prompts. The facts (webui modules/sd_hijack_clip.py, sd_hijack_open_clip.py; sd-scripts library/train_util.py):
- A caption is tokenized without special tokens and split into chunks of 75 tokens; each chunk becomes
  [BOS] + its tokens + [EOS], padded to 77, and is encoded on its own; the chunk outputs are concatenated along the
  sequence, so a prompt gives 77 * k states. A prompt of exactly 75 tokens is one chunk, 76 tokens two.
- When a chunk fills up and a comma lies within the last `comma_backtrack` (default 20) tokens, the words after the
  comma move to the next chunk (`comma_padding_backtrack`).
- CLIP-L pads with EOS; OpenCLIP (SD2, SDXL's second encoder) puts 0 after the first EOS.
- In a batch, every caption gets as many chunks as the longest one needs; the missing chunks are "empty" ones
  ([BOS] + EOS...). `max_tokens` (75/150/225) caps the chunks; tokens beyond are dropped.
- SDXL's pooled vector comes from the first chunk.
Not copied from the webui: emphasis syntax `(word:1.2)` and textual-inversion names are NOT parsed (a caption is
read literally, as sd-scripts does), and there is no BREAK keyword.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import BadInput

CHUNK = 75
CONTEXT = CHUNK + 2
BOS_ID, EOS_ID = 49406, 49407
COMMA_ID = 267  # ",</w>" in CLIP's vocabulary


def check_max_tokens(max_tokens: int) -> int:
    if max_tokens not in (75, 150, 225):
        raise BadInput(f"max_token_length must be 75, 150 or 225; got {max_tokens}")
    return max_tokens


def split_chunks(tokens: Sequence[int], max_chunks: int, comma_id: int | None = COMMA_ID,
                 comma_backtrack: int = 20) -> list[list[int]]:
    """Split one caption's tokens (no specials) into chunks of at most 75, moving the words after a nearby comma to
    the next chunk as the webui does; at most `max_chunks` chunks (the rest is dropped). Always at least one chunk."""
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1
    for token in tokens:
        if token == comma_id:
            last_comma = len(current)
        elif (comma_backtrack and len(current) == CHUNK and last_comma != -1
              and len(current) - last_comma <= comma_backtrack):
            moved = current[last_comma + 1:]
            chunks.append(current[:last_comma + 1])
            current, last_comma = moved, -1
        if len(current) == CHUNK:
            chunks.append(current)
            current, last_comma = [], -1
        if len(chunks) >= max_chunks:
            return chunks[:max_chunks]
        current.append(token)
    if current or not chunks:
        chunks.append(current)
    return chunks[:max_chunks]


def chunk_ids(token_lists: Sequence[Sequence[int]], *, max_tokens: int = 75, pad_id: int = EOS_ID,
              bos_id: int = BOS_ID, eos_id: int = EOS_ID, comma_id: int | None = COMMA_ID, comma_backtrack: int = 20,
              pad_chunks: bool = False) -> torch.Tensor:
    """Token lists (one per caption, no specials) -> (B, k, 77) ids, k = chunks the longest caption needs
    (`pad_chunks`: always max_tokens / 75, a constant shape for caches)."""
    max_chunks = check_max_tokens(max_tokens) // CHUNK
    per_caption = [split_chunks(t, max_chunks, comma_id, comma_backtrack) for t in token_lists]
    count = max_chunks if pad_chunks else max(len(c) for c in per_caption)
    out = torch.full((len(per_caption), count, CONTEXT), pad_id, dtype=torch.long)
    for b, chunks in enumerate(per_caption):
        for k in range(count):
            body = chunks[k] if k < len(chunks) else []
            row = [bos_id] + list(body) + [eos_id]
            out[b, k, : len(row)] = torch.tensor(row, dtype=torch.long)  # the rest stays pad_id
    return out


def needed_chunks(n_tokens: int) -> int:
    return max(1, math.ceil(n_tokens / CHUNK))


# ---- tokenizers ---------------------------------------------------------------------------------------------------
def tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without BOS/EOS and without truncation, from a transformers CLIPTokenizer or open_clip's tokenizer."""
    if hasattr(tokenizer, "encoder") and hasattr(tokenizer, "encode") and not hasattr(tokenizer, "get_vocab"):
        return [list(tokenizer.encode(t)) for t in texts]  # open_clip SimpleTokenizer
    out = tokenizer(list(texts), truncation=False, add_special_tokens=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def open_clip_tokenizer():
    """open_clip's module-level tokenizer (what the webui uses for OpenCLIP), or CLIP's own built offline."""
    try:
        import open_clip.tokenizer as oct

        return oct._tokenizer
    except Exception:  # open_clip missing or changed: the same BPE through transformers
        from ..clip_tokenizer import load_clip_tokenizer

        return load_clip_tokenizer()


# ---- encoders -----------------------------------------------------------------------------------------------------
def hf_text_core(model):
    """The module holding `final_layer_norm` (transformers 4 nests it under `text_model`, 5 drops that level for
    CLIPTextModel but keeps it for CLIPTextModelWithProjection)."""
    return getattr(model, "text_model", model)


def encode_hf_clip(model, ids: torch.Tensor, *, clip_skip: int = 1, hidden_index: int | None = None,
                   final_norm: bool = True, pooled: bool = False):
    """HF CLIP text model over (N, 77) ids.

    `hidden_index` given (SDXL): that entry of hidden_states, no final norm. Otherwise clip skip as the webui's SD1
    path does: the last layer (already normed) for 1, else hidden_states[-clip_skip] + final_layer_norm.
    With `pooled`, also returns the projected pooled output (`text_embeds`, CLIPTextModelWithProjection)."""
    out = model(input_ids=ids, output_hidden_states=True)
    if hidden_index is not None:
        states = out.hidden_states[hidden_index]
    elif clip_skip <= 1:
        states = out.last_hidden_state
    else:
        if clip_skip > len(out.hidden_states):
            layers = len(out.hidden_states) - 1
            raise BadInput(f"clip_skip {clip_skip} is deeper than the text encoder's {layers} layers")
        states = out.hidden_states[-clip_skip]
        if final_norm:
            states = hf_text_core(model).final_layer_norm(states)
    if pooled:
        return states, out.text_embeds
    return states


def open_clip_batch_first(model) -> bool:
    """open_clip 3.x runs its text tower batch-first; 2.x (the webui's 2.20) sequence-first (L, N, D)."""
    return bool(getattr(model.transformer, "batch_first", False))


def encode_open_clip(model, ids: torch.Tensor, *, skip_last: int = 1, final_norm: bool = True, pooled: bool = False):
    """open_clip text tower over (N, 77) ids, stopping `skip_last` blocks before the end.

    SD2: skip_last 1 (penultimate) + ln_final. SDXL's second encoder: skip_last 1, no ln_final, plus the pooled
    vector = ln_final(last block output) at the EOS (argmax id) @ text_projection."""
    blocks = model.transformer.resblocks
    stop = len(blocks) - skip_last
    if stop < 0:
        raise BadInput(f"clip_skip too deep for an OpenCLIP text encoder of {len(blocks)} layers")
    x = model.token_embedding(ids)  # may be the webui's EmbeddingsWithFixes wrapper (no .weight)
    x = x + model.positional_embedding.to(x.dtype)
    mask = model.attn_mask
    if mask is not None:
        mask = mask.to(device=x.device, dtype=x.dtype if x.is_floating_point() else mask.dtype)
    batch_first = open_clip_batch_first(model)
    if not batch_first:
        x = x.permute(1, 0, 2)
    states = x if stop == 0 else None
    for i, block in enumerate(blocks):
        if states is not None and not pooled:
            break
        x = block(x, attn_mask=mask)
        if i + 1 == stop:
            states = x
    if states is None:
        states = x
    if not batch_first:
        states = states.permute(1, 0, 2)
        x = x.permute(1, 0, 2)
    if final_norm:
        states = model.ln_final(states)
    if not pooled:
        return states
    last = model.ln_final(x)
    eos = last[torch.arange(last.shape[0], device=last.device), ids.argmax(dim=-1)]
    projection = model.text_projection
    pooled_out = projection(eos) if isinstance(projection, torch.nn.Module) else eos @ projection
    return states, pooled_out


def join_chunks(states: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*k, 77, D) -> (B, k*77, D): chunk outputs side by side, as the webui's torch.hstack of chunk results."""
    n, length, dim = states.shape
    return states.reshape(batch, (n // batch) * length, dim)
