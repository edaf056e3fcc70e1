"""The tokenizer wrapper: which tokens a text becomes, and which bytes each token stands for.

One class, `Tokenization`, for every tokenizer family that vLLM serves, so that `spans.py` and
`scoring.py` never ask which one they have:

* **byte-level BPE** (GPT-2, Llama 3, Qwen): a piece is a string of GPT-2's byte alphabet;
* **SentencePiece** with a `▁` word marker and byte fallback (Llama 2, Mistral 7B as hub
  repositories hold them, TinyLlama, Yi, Gemma), as a transformers tokenizer: `▁` is a space,
  `<0xCE>` is the byte 0xCE, and the encoder puts a `▁` (the *dummy prefix*) in front of a text
  (and, in Llama's legacy mode, after every special token in it);
* **mistral-common** (`tokenizer_mode="mistral"`, vLLM's `MistralTokenizer`): Tekken, whose
  pieces are bytes, and mistral-common's SentencePiece. Its chat encoding is mistral-common's own,
  to token ids, with no text rendering in between.

What a token stands for (`token_bytes`): the bytes it puts into the text where it stands. That is
the piece's bytes, except where the token carries the dummy prefix: its leading space is the
tokenizer's, not the text's, and a text's scored tokens would otherwise not join to the text
(`" said Ωμέγα"` read back as `saidΩμέγα` is the bug this replaces). `align` finds those
positions by walking the tokens along the UTF-8 of the text that they were encoded from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: Texts put in front of a continuation to encode it as it reads after other text, without the
#: dummy prefix: the first whose tokens end exactly where the text starts is used.
SENTINELS = ("\n", "a", ".", "#")


def _byte_decoder() -> dict[str, int]:
    # The inverse of GPT-2's bytes_to_unicode table, which byte-level BPE vocabularies use.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _fallback_byte(piece: str) -> int | None:
    """The byte of a SentencePiece byte-fallback piece (`<0xCE>`), else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def _sentencepiece_bytes(piece: str) -> bytes:
    byte = _fallback_byte(piece)
    return bytes([byte]) if byte is not None else piece.replace("▁", " ").encode("utf-8")


@dataclass(frozen=True)
class Alignment:
    """Tokens laid along the text they were encoded from: `ends[i]` is the byte offset in the
    text's UTF-8 where token `i` ends, and `trim` holds the tokens whose leading space is the
    tokenizer's dummy prefix (their piece's first byte is not in the text)."""

    ends: list[int]
    trim: frozenset[int]

    def token_at(self, offset: int) -> int:
        """The index of the token that holds byte `offset` of the text."""
        for i, end in enumerate(self.ends):
            if end > offset:
                return i
        return len(self.ends)


class Tokenization:
    """Encodes text as vLLM encodes a prompt, and says which bytes each token stands for.

    `encode(text)` is `tokenizer.encode(text, add_special_tokens=True)`, what vLLM's completions
    path does (a BOS token is added where the tokenizer adds one); `encode_plain` adds no special
    token. `prefix_token_id` is the BOS token, or the EOS token when there is no BOS; it stands
    in for an empty context and starts the first rolling window.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        prefix = tokenizer.bos_token_id
        if prefix is None:
            prefix = tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to use as a prefix")
        self.prefix_token_id: int = prefix
        #: vLLM's `MistralTokenizer` (`tokenizer_mode="mistral"`): mistral-common's encodings.
        self.is_mistral = bool(getattr(tokenizer, "IS_MISTRAL_TOKENIZER", False))
        self._pieces: dict[int, bytes] = {}
        self._tokens: dict[tuple[int, bool], tuple[str, list[int]]] = {}
        self._piece_bytes = self._piece_reader()
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        #: The number of ids the model's vocabulary has (a token id must be below it).
        self.vocab_size = _vocab_size(tokenizer)
        #: Whether the encoder puts a space that is not in the text in front of it (the
        #: SentencePiece dummy prefix): then `align` is needed to tell a token's bytes.
        self.dummy_prefix = self.joined(self.encode_plain("a")) != b"a"

    # Encoding

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_continuation(self, text: str) -> list[int]:
        """The tokens of `text` as it reads after other text: `encode_plain(text)`, except that a
        tokenizer's dummy prefix is not put in front of it (SentencePiece encodes `"Paris"` alone
        as `▁Paris`, a word that starts with a space). The text is then encoded after a sentinel
        (a newline, else a letter) and the sentinel's tokens are cut off, where they end exactly
        where the text starts."""
        ids = self.encode_plain(text)
        data = text.encode("utf-8")
        if not self.dummy_prefix or self.joined(ids) == data:
            return ids
        for sentinel in SENTINELS:
            head = sentinel.encode("utf-8")
            both = self.encode_plain(sentinel + text)
            alignment = self.align(both, head + data)
            if alignment is None:
                continue
            cut = alignment.token_at(len(head) - 1) + 1
            if cut < len(both) and alignment.ends[cut - 1] == len(head):
                tail = both[cut:]
                if self.joined(tail) == data:
                    return tail
        return ids

    # Bytes

    def _piece_reader(self) -> Callable[[int], bytes]:
        tok = self.tokenizer
        if self.is_mistral:
            inner = tok.tokenizer  # mistral-common's Tekkenizer or SentencePieceTokenizer
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

            def mistral_piece(token_id: int) -> bytes:
                if inner.is_special(token_id):
                    return inner.decode([token_id], SpecialTokenPolicy.KEEP).encode("utf-8")
                if getattr(tok, "is_tekken", False):
                    return inner.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
                return _sentencepiece_bytes(inner.id_to_piece(token_id))

            return mistral_piece

        added = {
            i: str(getattr(t, "content", t))
            for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items()
        }
        decoder = repr(getattr(getattr(tok, "backend_tokenizer", None), "decoder", None))
        byte_level = _byte_decoder() if "ByteLevel" in decoder else None
        sentencepiece = "Metaspace" in decoder or "▁" in decoder

        def hf_piece(token_id: int) -> bytes:
            if token_id in added:
                return added[token_id].encode("utf-8")
            piece = tok.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                if byte_level is not None and all(c in byte_level for c in piece):
                    return bytes(byte_level[c] for c in piece)
                if sentencepiece:
                    return _sentencepiece_bytes(piece)
                byte = _fallback_byte(piece)
                if byte is not None:
                    return bytes([byte])
            return tok.decode([token_id]).encode("utf-8")

        return hf_piece

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes of the token's piece in the vocabulary (`▁` a space, `<0xCE>` one byte)."""
        hit = self._pieces.get(token_id)
        if hit is None:
            hit = self._pieces[token_id] = self._piece_bytes(token_id)
        return hit

    def joined(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.piece_bytes(i) for i in ids)

    def is_special(self, token_id: int) -> bool:
        if self.is_mistral:
            return bool(self.tokenizer.tokenizer.is_special(token_id))
        return token_id in self._special

    def align(self, ids: Sequence[int], data: bytes) -> Alignment | None:
        """Lay `ids` along `data`, the UTF-8 of the text they were encoded from, or None where
        they do not spell it. A token's piece must be the next bytes of the text, or be so once
        a leading space (the dummy prefix) is dropped; a special token stands for its text where
        the text holds it, or for no bytes where the encoder added it (a BOS). Where a token
        reads more than one way, the reading that spells the rest of the text is taken (the
        text `<s>` after an added `<s>`)."""
        # Depth-first over each token's readings, the most literal first. Only special tokens
        # and pieces with a leading space read more than one way, so on ordinary text this is
        # one pass; `dead` keeps a (token, offset) that cannot spell the rest from being retried.
        frames: list[list[tuple[int, bool]]] = []  # per token: its readings not yet tried
        ends: list[int] = []
        trims: list[bool] = []
        dead: set[tuple[int, int]] = set()
        at = 0
        while True:
            i = len(frames)
            if i == len(ids) and at == len(data):
                return Alignment(ends, frozenset(j for j, t in enumerate(trims) if t))
            if i < len(ids) and (i, at) not in dead:
                frames.append(self._readings(ids[i], data, at))
            while frames and not frames[-1]:
                frames.pop()
                dead.add((len(frames), ends[len(frames) - 1] if frames else 0))
            if not frames:
                return None
            i = len(frames) - 1
            at, trimmed = frames[i].pop()
            ends[i:] = [at]
            trims[i:] = [trimmed]

    def _readings(self, token_id: int, data: bytes, at: int) -> list[tuple[int, bool]]:
        """Where token `token_id` can end if it starts at byte `at` of `data`, with whether its
        leading space is dropped; the most literal reading last (the one tried first)."""
        piece = self.piece_bytes(token_id)
        readings: list[tuple[int, bool]] = []
        if self.is_special(token_id):
            readings.append((at, False))
        if piece[:1] == b" " and data.startswith(piece[1:], at):
            readings.append((at + len(piece) - 1, True))
        if data.startswith(piece, at):
            readings.append((at + len(piece), False))
        return readings

    def trimmed(self, ids: Sequence[int], text: str | bytes | None = None) -> frozenset[int]:
        """The indices of `ids` whose leading space is the dummy prefix, given the text they
        were encoded from; none where the tokenizer never adds one, or where the ids do not
        spell the text. Without a text (token ids given as they are), the ids are read as the
        encoder gives a text's tokens: the dummy prefix is on the first token that is not a
        special one, as on a text prompt's."""
        if not self.dummy_prefix or not ids:
            return frozenset()
        if text is None:
            for i, token_id in enumerate(ids):
                if not self.is_special(token_id):
                    return frozenset([i]) if self.piece_bytes(token_id)[:1] == b" " else frozenset()
            return frozenset()
        data = text.encode("utf-8") if isinstance(text, str) else text
        alignment = self.align(ids, data)
        return alignment.trim if alignment is not None else frozenset()

    def token(self, token_id: int, trim: bool = False) -> tuple[str, list[int]]:
        """A scored token's `(token, bytes)`: the bytes it stands for in the text (without its
        leading space where `trim`), and those bytes decoded (U+FFFD where a character is split
        between tokens, as in vLLM's own logprobs)."""
        key = (token_id, trim)
        hit = self._tokens.get(key)
        if hit is None:
            data = self.text_bytes(token_id, trim)
            hit = self._tokens[key] = (data.decode("utf-8", errors="replace"), list(data))
        return hit

    def text_bytes(self, token_id: int, trim: bool = False) -> bytes:
        """The bytes the token stands for in the text: its piece's, less the leading space
        where `trim` (the dummy prefix)."""
        data = self.piece_bytes(token_id)
        return data[1:] if trim and data[:1] == b" " else data

    def text_of(self, ids: Sequence[int], trim: frozenset[int] = frozenset()) -> str:
        """What `ids` stand for, with the leading space of the tokens at `trim` dropped."""
        data = b"".join(self.text_bytes(t, i in trim) for i, t in enumerate(ids))
        return data.decode("utf-8", errors="replace")

    def first_unknown(self, ids: Sequence[int]) -> int | None:
        """The index of the first of `ids` outside the vocabulary, or None."""
        for j, token_id in enumerate(ids):
            if not 0 <= token_id < self.vocab_size:
                return j
        return None

    def check_ids(self, ids: Sequence[Any], what: str) -> list[int]:
        """`ids` as token ids of this vocabulary; a `ValueError` names `what[j]` otherwise."""
        for j, token_id in enumerate(ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise ValueError(f"{what}[{j}] must be a token id (an integer)")
        j = self.first_unknown(ids)
        if j is not None:
            raise ValueError(
                f"{what}[{j}] is token id {ids[j]}, outside the model's vocabulary "
                f"(0 to {self.vocab_size - 1})"
            )
        return list(ids)

    # Chat

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        chat_template: str | None,
        chat_template_kwargs: dict[str, Any],
    ) -> tuple[list[int], bytes]:
        """The token ids of a conversation as vLLM's chat endpoint gives them to the engine,
        and the text they stand for (UTF-8).

        A transformers tokenizer renders the chat template to text, which is encoded without
        special tokens (the template writes them). A mistral-common tokenizer encodes the
        conversation itself, to ids; a conversation that ends with an assistant message is
        encoded as mistral-common encodes one inside a conversation: its content and `</s>`
        (`continue_final_message` leaves the `</s>` off, as vLLM's generation does)."""
        if not self.is_mistral:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                **chat_template_kwargs,
            )
            return self.encode_plain(text), text.encode("utf-8")
        options = dict(chat_template_kwargs)
        continue_final = bool(options.pop("continue_final_message", False))
        if options or chat_template is not None:
            raise ValueError(
                "chat_template and chat_template_kwargs are not supported with a mistral-common "
                "tokenizer (tokenizer_mode=mistral), which encodes the conversation itself"
            )
        ids = self._mistral_chat(messages, add_generation_prompt, continue_final)
        return ids, self.joined(ids)

    def _mistral_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final: bool
    ) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        last = messages[-1]["role"]
        try:
            if last != "assistant" or continue_final:
                return list(
                    self.tokenizer.apply_chat_template(
                        messages,
                        add_generation_prompt=add_generation_prompt and last != "assistant",
                        continue_final_message=continue_final,
                    )
                )
            # mistral-common's validator (test mode, as vLLM runs it) refuses a conversation
            # that ends with an assistant message. The conversation before it is validated as
            # vLLM's chat endpoint would; the whole is then encoded without the validator, by
            # mistral-common's own normalizer and instruct tokenizer.
            self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
            mistral = self.tokenizer.mistral
            request = ChatCompletionRequest.from_openai(messages=messages)
            instruct = mistral._instruct_request_normalizer.from_chat_completion_request(request)
            return list(mistral.instruct_tokenizer.encode_instruct(instruct).tokens)
        except (AssertionError, MistralCommonException, ValueError) as e:
            raise ValueError(f"mistral-common refuses the conversation: {e}") from None


def _vocab_size(tokenizer: Any) -> int:
    max_id = getattr(tokenizer, "max_token_id", None)
    if isinstance(max_id, int):
        return max_id + 1
    return len(tokenizer)
