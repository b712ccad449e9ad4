"""Characters to ids and back. Torch-free: the runtime rebuilds the same object from a bundle's manifest."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

UNK_ID = 0  # id 0 stands for every character the training text did not contain
SCAN_CHUNK = 1 << 16  # characters per slice of Vocab.scan


class Vocab:
    """A character vocabulary: id 0 is the unknown id, ids 1.. are the characters in code-point order."""

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("vocabulary characters must be distinct single characters")
        self.chars: list[str] = list(chars)  # id - 1 -> character
        self._index = {c: i + 1 for i, c in enumerate(self.chars)}
        # Fast path for encoding: a lookup table over code points below 65536.
        self._table = np.zeros(65536, dtype=np.int64)
        for c, i in self._index.items():
            if ord(c) < 65536:
                self._table[ord(c)] = i
        self._id_to_char = ["\ufffd", *self.chars]  # unknown decodes as U+FFFD

    @classmethod
    def build(cls, text: str) -> Vocab:
        return cls(sorted(set(text)))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    unk_id = UNK_ID

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as int64, unknown characters mapped to :data:`UNK_ID`."""
        return self._encode_codes(_codes(text))

    def _encode_codes(self, codes: np.ndarray) -> np.ndarray:
        if len(codes) == 0:
            return np.zeros(0, dtype=np.int64)
        wide = codes >= 65536
        if not wide.any():
            return self._table[codes]
        # Characters beyond the table: one dictionary look-up per distinct code point, not per character.
        ids = self._table[np.where(wide, 0, codes)]
        distinct, inverse = np.unique(codes[wide], return_inverse=True)
        mapped = np.array([self._index.get(chr(int(c)), UNK_ID) for c in distinct], dtype=np.int64)
        ids[wide] = mapped[inverse]
        return ids

    def scan(self, text: str, limit: int | None = None) -> tuple[np.ndarray, list[str], int]:
        """``encode(text)``, the first ``limit`` (None: all) distinct unknown characters in order of first
        appearance, and how many distinct unknown characters there are. Vectorised (about 10 ns a character)
        and in slices of :data:`SCAN_CHUNK` characters, so that the temporary arrays stay small whatever the
        length: beyond the ids themselves, a 1,000,000-character text needs about 2 MB."""
        ids = np.empty(len(text), dtype=np.int64)
        seen: np.ndarray | None = None  # code point -> already counted (made at the first unknown character)
        shown: list[str] = []
        count = 0
        for a in range(0, len(text), SCAN_CHUNK):
            codes = _codes(text[a : a + SCAN_CHUNK])
            part = self._encode_codes(codes)
            ids[a : a + len(part)] = part
            unknown = codes[part == UNK_ID]
            if len(unknown) == 0:
                continue
            if seen is None:
                seen = np.zeros(0x110000, dtype=bool)
            distinct, first = np.unique(unknown, return_index=True)
            in_order = distinct[np.argsort(first, kind="stable")]
            new = in_order[~seen[in_order]]
            seen[new] = True
            count += len(new)
            room = len(new) if limit is None else max(0, limit - len(shown))
            shown += [chr(int(c)) for c in new[:room]]
        return ids, shown, count

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that are not in the vocabulary, in order of first appearance."""
        return self.scan(text)[1]

    def decode(self, ids: Iterable[int]) -> str:
        table = self._id_to_char
        return "".join(table[i] for i in ids)

    def id_to_char(self, i: int) -> str:
        return self._id_to_char[i]

    def to_list(self) -> list[str]:
        return list(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(tuple(self.chars))


def _codes(text: str) -> np.ndarray:
    """The code points of ``text`` (uint32)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if text else np.zeros(0, dtype=np.uint32)
