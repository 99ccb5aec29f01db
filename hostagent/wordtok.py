"""The emulator's tokenizer: words and punctuation marks, each one token.

A token's id is a hash of its text (the first 4 bytes of BLAKE2b, less 31 bits), so every
emulator instance -- and the lab's routers that ask any of them -- gives the same text the
same ids without sharing a vocabulary file. Special markers of the emulator's chat
template are ordinary tokens too. /detokenize turns back the ids this process has seen
(a bounded reverse table); others come back as "<|id|>". This is not the model's
tokenizer: with a real vLLM, block hashes come from its own tokenizer via its events.
"""

from __future__ import annotations

import collections
import hashlib
import re

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
ID_MASK = 0x7FFFFFFF
MAX_REVERSE = 200_000  # reverse-table entries kept for /detokenize (least recent out)


def split(text: str) -> list[str]:
    """Words and punctuation marks (about 1.3 per English word)."""
    return _TOKEN_RE.findall(text)


def chat_words(messages: object, add_generation_prompt: bool = True) -> list[str]:
    """The emulator's chat template: a role marker and the role before each message's
    words. One place, so that the emulator and the bridge's block hashes agree.
    ValueError for messages that are not a non-empty list of role-bearing objects."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    tokens: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message needs a role")
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        tokens += ["<|role|>", str(message["role"])] + split(str(content))
    if add_generation_prompt:
        tokens.append("<|assistant|>")
    return tokens


class WordTokenizer:
    def __init__(self, max_reverse: int = MAX_REVERSE) -> None:
        self.max_reverse = max_reverse
        self._reverse: collections.OrderedDict[int, str] = collections.OrderedDict()

    def token_id(self, word: str) -> int:
        tid = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(),
                             "big") & ID_MASK
        self._reverse[tid] = word
        self._reverse.move_to_end(tid)
        if len(self._reverse) > self.max_reverse:
            self._reverse.popitem(last=False)
        return tid

    def ids(self, words: list[str]) -> list[int]:
        return [self.token_id(w) for w in words]

    def encode(self, text: str) -> list[int]:
        return self.ids(split(text))

    def word(self, token_id: int) -> str:
        return self._reverse.get(token_id, f"<|{token_id}|>")

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(self.word(t) for t in token_ids)
