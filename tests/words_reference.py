"""The reference of word scores: a transformers forward pass (float32, full softmax) and B taken
from the tokenizer's own vocabulary, written apart from `vllm_loglik.words`.

B is found from each family's own view of its pieces: byte-level BPE's printable-byte pieces
(`Ġ` a space), SentencePiece's `▁` and `<0x0A>` pieces, Tekken's byte pieces; plus the EOS and
every special token. Words are the runs of `\\S+` of the entry's text, laid on the scored
tokens by their bytes (the bytes of each token are checked against the tokenizer elsewhere:
tests/test_tokenizer_bytes.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character of each byte (its `encoder.py`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _space_start(data: bytes) -> bool:
    return data.decode("utf-8", errors="replace")[:1].isspace()


def _space_end(data: bytes) -> bool:
    return data.decode("utf-8", errors="replace")[-1:].isspace()


def boundary_ids(family: Any, width: int) -> set[int]:
    """B for `family` (tests/test_tokenizers.py's `Family`), over `width` logits."""
    out: set[int] = set()
    if family.mistral is not None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        raw = family.mistral.instruct_tokenizer.tokenizer
        for i in range(min(raw.n_words, width)):
            if raw.is_special(i) or i == raw.eos_id:
                out.add(i)
            elif _space_start(raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)):
                out.add(i)
        return out
    tok = family.hf
    special = set(tok.all_special_ids) | {tok.eos_token_id}
    special |= {i for i in (tok.added_tokens_decoder or {})}
    pieces = tok.convert_ids_to_tokens(list(range(min(len(tok), width))))
    if any(p.startswith("▁") for p in pieces if p):
        for i, p in enumerate(pieces):
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p or "")
            data = bytes([int(m.group(1), 16)]) if m else (p or "").replace("▁", " ").encode()
            if i in special or _space_start(data):
                out.add(i)
        return out
    decoder = {v: k for k, v in bytes_to_unicode().items()}
    for i, p in enumerate(pieces):
        if i in special or (p and all(c in decoder for c in p) and _space_start(bytes(decoder[c] for c in p))):
            out.add(i)
    return out


@dataclass
class Rows:
    """Per scored token: its logprob, log P_B of its row and of the row after it."""

    logprobs: list[float]
    before: list[float]
    after: list[float]


def rows(family: Any, ids: list[int], start: int, boundary: set[int] | None = None) -> Rows:
    """The reference rows of `ids[start:]` given `ids[:start]`."""
    torch = family.ref.torch
    with torch.no_grad():
        logits = family.ref.model(torch.tensor([ids])).logits[0].float()
    lsm = torch.log_softmax(logits, dim=-1)
    if boundary is None:
        boundary = boundary_ids(family, lsm.shape[-1])
    mask = torch.zeros(lsm.shape[-1], dtype=torch.bool)
    mask[list(boundary)] = True
    pb = torch.logsumexp(lsm[:, mask], dim=-1).tolist()
    lps = [lsm[p - 1, ids[p]].item() for p in range(start, len(ids))]
    return Rows(lps, [pb[p - 1] for p in range(start, len(ids))], [pb[p] for p in range(start, len(ids))])


def join(parts: list[Rows]) -> Rows:
    return Rows(*(sum((getattr(r, f) for r in parts), []) for f in ("logprobs", "before", "after")))


@dataclass
class RefWord:
    text: str
    offset: int
    num_tokens: int
    logprob: float
    tokens_logprob: float


def words(
    text: str,
    token_ids: list[int],
    token_bytes: list[bytes],
    r: Rows,
    boundary: set[int],
    piece_bytes: Any,
    corrected: bool = True,
    offsets: list[tuple[int, int]] | None = None,
) -> list[RefWord]:
    """The words of `text` on its scored tokens, with `r`'s numbers. `piece_bytes(id)` is the
    token's vocabulary bytes (for whether it ends with whitespace)."""
    scored = b"".join(token_bytes)
    data = text.encode()
    base = scored.find(data)
    if base < 0:
        base = scored.find(text.strip().encode()) - len(text[: text.find(text.strip())].encode())
    bounds, at = [], 0
    for b in token_bytes:
        bounds.append((at, at + len(b)))
        at += len(b)
    spans = offsets or [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    groups: list[list[Any]] = []
    for cs, ce in spans:
        ws, we = base + len(text[:cs].encode()), base + len(text[:ce].encode())
        toks = [i for i, (s, e) in enumerate(bounds) if s < we and e > ws]
        if not toks:
            continue
        if groups and toks[0] <= groups[-1][3]:
            groups[-1][1], groups[-1][3] = ce, toks[-1]
        else:
            groups.append([cs, ce, toks[0], toks[-1]])
    out = []
    for cs, ce, i, j in groups:
        total = math.fsum(r.logprobs[i : j + 1])
        value = total
        if corrected:
            b = r.before[i]
            before = b if token_ids[i] in boundary else math.log(-math.expm1(b))
            after = 0.0 if _space_end(piece_bytes(token_ids[j])) else r.after[j]
            value = total + after - before
        out.append(RefWord(text[cs:ce], cs, j - i + 1, value, total))
    return out


def piece_reader(family: Any):
    """The vocabulary bytes of a token id, from the family's own tokenizer."""
    if family.mistral is not None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        raw = family.mistral.instruct_tokenizer.tokenizer
        return lambda i: raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)
    tok = family.hf
    pieces = tok.convert_ids_to_tokens
    if any(p.startswith("▁") for p in pieces(list(range(min(len(tok), 2000)))) if p):

        def sp(i: int) -> bytes:
            p = pieces(i)
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p)
            return bytes([int(m.group(1), 16)]) if m else p.replace("▁", " ").encode()

        return sp
    decoder = {v: k for k, v in bytes_to_unicode().items()}

    def bl(i: int) -> bytes:
        p = pieces(i)
        return bytes(decoder[c] for c in p) if all(c in decoder for c in p) else p.encode()

    return bl
