"""The packed layout and its conversions, as small pure functions (in the spirit of FlashAttention's bert_padding.py).

A packed batch holds every sentence end to end with no padding: `input_ids` `[total_tokens]`, and `cu_seqlens`
(int32, `[batch + 1]`) where sentence i is tokens `cu_seqlens[i]:cu_seqlens[i + 1]`. `longest` is the number of
tokens of the batch's longest sentence: the length a padded rectangle needs (FlashAttention calls it max_seqlen).
It is not `max_seq_length`, the tokenizer's truncation limit, which only bounds it. Everything that needs a padded
rectangle (attention backends, reference checks) converts here and nowhere else.
"""

import itertools

import torch


def pack(id_lists: list) -> dict:
    """Token id lists -> {"input_ids": [total_tokens] int64, "cu_seqlens": [batch + 1] int32, "longest": int}."""
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(id_lists) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    input_ids = torch.tensor([token for ids in id_lists for token in ids], dtype=torch.long)
    return {"input_ids": input_ids, "cu_seqlens": cu_seqlens, "longest": int(lengths.max()) if id_lists else 0}


def split(batch: dict, size: int) -> list:
    """A packed batch -> packed batches of at most `size` sentences each, in order (views of its input_ids)."""
    cu_seqlens = batch["cu_seqlens"]
    pieces = []
    for start in range(0, len(cu_seqlens) - 1, size):
        end = min(start + size, len(cu_seqlens) - 1)
        piece_cu = cu_seqlens[start:end + 1] - cu_seqlens[start]
        pieces.append({"input_ids": batch["input_ids"][int(cu_seqlens[start]):int(cu_seqlens[end])],
                       "cu_seqlens": piece_cu, "longest": int(lengths(piece_cu).max())})
    return pieces


def lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[batch] int64: the number of tokens of each sentence."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def length_runs(cu_seqlens: torch.Tensor) -> list:
    """[(length, count)]: runs of consecutive sentences of equal length, in packing order."""
    return [(length, len(list(run))) for length, run in itertools.groupby(lengths(cu_seqlens).tolist())]


def sequence_ids(cu_seqlens: torch.Tensor, total_tokens: int = None) -> torch.Tensor:
    """[total_tokens] int64: the sentence each token belongs to."""
    total_tokens = int(cu_seqlens[-1]) if total_tokens is None else total_tokens
    return torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=cu_seqlens.device), lengths(cu_seqlens),
                                   output_size=total_tokens)


def token_coordinates(cu_seqlens: torch.Tensor):
    """For each token: (its sentence, its position in that sentence), both [total_tokens] int64."""
    sentence = sequence_ids(cu_seqlens)
    position = torch.arange(len(sentence), device=cu_seqlens.device) - cu_seqlens[:-1].long()[sentence]
    return sentence, position


def padding_slots(cu_seqlens: torch.Tensor, longest: int) -> torch.Tensor:
    """[total_tokens] int64: each token's row in a padded [batch * longest] layout."""
    sentence, position = token_coordinates(cu_seqlens)
    return sentence * longest + position


def pad(x: torch.Tensor, slots: torch.Tensor, batch: int, longest: int) -> torch.Tensor:
    """[total_tokens, heads, dim] -> [batch, heads, longest, dim], zeros past each sentence's end.

    Padded token-major (one index_copy) and returned as a heads-first view: SDPA reads it through strides."""
    padded = x.new_zeros(batch * longest, *x.shape[1:])  # zeros: padded keys and values stay finite
    padded.index_copy_(0, slots, x)
    return padded.view(batch, longest, *x.shape[1:]).transpose(1, 2)


def unpad(padded: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[batch, heads, longest, dim] -> [total_tokens, heads, dim]: the inverse of `pad`."""
    batch, heads, longest, dim = padded.shape
    return padded.transpose(1, 2).reshape(batch * longest, heads, dim).index_select(0, slots)


def key_padding_mask(cu_seqlens: torch.Tensor, longest: int) -> torch.Tensor:
    """[batch, 1, 1, longest] bool, True at a sentence's real tokens (broadcasts over heads and queries)."""
    keep = torch.arange(longest, device=cu_seqlens.device)[None, :] < lengths(cu_seqlens)[:, None]
    return keep[:, None, None, :]
