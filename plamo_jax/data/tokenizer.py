"""Tokenizers behind one interface: bytes (no training), SentencePiece models, Hugging Face tokenizer.json.

Every tokenizer encodes without special tokens; the pipeline and tools/tokenize_corpus.py add
BOS/EOS themselves so that all tokenizers frame documents the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from plamo_jax.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def fingerprint(self) -> str:
        """A short hash that changes whenever the text -> ids mapping may change."""
        ...


def encode_to_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as an int32 array (a fast path for the byte tokenizer)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids: pad 0, bos 1, eos 2, byte b -> b + 3 (vocab 259)."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    byte_offset = 3
    vocab_size = 256 + byte_offset

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.byte_offset

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids_array = np.asarray(ids, dtype=np.int64)
        byte_ids = ids_array[(ids_array >= self.byte_offset) & (ids_array < self.vocab_size)]
        # Windows cut inside a multi-byte character are normal for a byte model's samples.
        return (byte_ids - self.byte_offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-utf8-offset3-v1"


class SentencePieceTokenizer:
    """A trained SentencePiece model (`.model` file); pad falls back to EOS when the model has none."""

    def __init__(self, model_path: str | Path):
        import sentencepiece

        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"SentencePiece model {str(self.path)!r} does not exist (expected a .model file)")
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as error:
            raise DataError(f"{str(self.path)!r} is not a readable SentencePiece model: {error}") from error
        self.vocab_size = int(self._processor.get_piece_size())
        self.bos_id = int(self._processor.bos_id())
        self.eos_id = int(self._processor.eos_id())
        if self.eos_id < 0 or self.bos_id < 0:
            raise DataError(
                f"SentencePiece model {str(self.path)!r} has bos_id={self.bos_id}, eos_id={self.eos_id}; "
                "expected both >= 0 (train it with tools/train_tokenizer.py)"
            )
        pad_id = int(self._processor.pad_id())
        self.pad_id = pad_id if pad_id >= 0 else self.eos_id
        self._special_ids = {self.bos_id, self.eos_id, self.pad_id}
        self._fingerprint = "spm-" + _file_sha256(self.path)[:16]

    def encode(self, text: str) -> list[int]:
        return list(self._processor.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids if int(i) not in self._special_ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._processor.id_to_piece(token_id)

    def fingerprint(self) -> str:
        return self._fingerprint


_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _special_from_config(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizer.json`; special tokens from arguments, tokenizer_config.json, or a guess."""

    def __init__(self, path: str | Path, *, bos_token: str = "", eos_token: str = "", pad_token: str = ""):
        import tokenizers

        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.is_file():
            raise DataError(f"tokenizer file {str(self.path)!r} does not exist (expected a tokenizer.json)")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:  # the Rust library raises a bare Exception for parse errors
            raise DataError(
                f"{str(self.path)!r} is not a readable Hugging Face tokenizer.json: {error}"
            ) from error
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        configured = self._read_tokenizer_config()
        self.chat_template_source = configured.get("chat_template")
        eos = self._resolve("eos", eos_token or configured.get("eos_token"), _EOS_CANDIDATES)
        if eos is None:
            raise DataError(
                f"cannot find an end-of-text token in {str(self.path)!r}; set data.eos_token "
                f"(tried tokenizer_config.json and {list(_EOS_CANDIDATES)})"
            )
        bos = self._resolve("bos", bos_token or configured.get("bos_token"), _BOS_CANDIDATES)
        pad = self._resolve("pad", pad_token or configured.get("pad_token"), _PAD_CANDIDATES)
        self.eos_id = eos
        self.bos_id = eos if bos is None else bos  # GPT-2 style vocabularies frame documents with EOS only
        self.pad_id = eos if pad is None else pad
        self._special_ids = {self.bos_id, self.eos_id, self.pad_id}
        self.special_tokens = {
            "bos_token": self._tokenizer.id_to_token(self.bos_id),
            "eos_token": self._tokenizer.id_to_token(self.eos_id),
        }
        specials = f"{self.bos_id},{self.eos_id},{self.pad_id}"
        self._fingerprint = (
            "hf-" + hashlib.sha256((_file_sha256(self.path) + specials).encode()).hexdigest()[:16]
        )

    def _read_tokenizer_config(self) -> dict[str, str]:
        config_path = self.path.parent / "tokenizer_config.json"
        if not config_path.is_file():
            return {}
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{str(config_path)!r} is not valid JSON: {error}") from error
        found = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token = _special_from_config(raw.get(key))
            if token:
                found[key] = token
        template = raw.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            found["chat_template"] = template
        return found

    def _resolve(self, role: str, token: str | None, candidates: Sequence[str]) -> int | None:
        if token:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise DataError(
                    f"{role} token {token!r} (data.{role}_token or tokenizer_config.json) is not in the "
                    f"vocabulary of {str(self.path)!r}"
                )
            return int(token_id)
        for candidate in candidates:
            token_id = self._tokenizer.token_to_id(candidate)
            if token_id is not None:
                return int(token_id)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character offsets in `text`."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(offset) for offset in encoding.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids if int(i) not in self._special_ids])

    def fingerprint(self) -> str:
        return self._fingerprint


def load_tokenizer(spec: str, *, bos_token: str = "", eos_token: str = "", pad_token: str = "") -> Tokenizer:
    """`byte`, a SentencePiece `.model` path, or a Hugging Face `tokenizer.json` (file or directory)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json" or path.is_dir():
        return HuggingFaceTokenizer(path, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
    raise DataError(
        f"data.tokenizer={spec!r} is not understood; expected 'byte', a SentencePiece .model file, "
        "or a Hugging Face tokenizer.json (or a directory containing one)"
    )


def tokenizer_from_config(data_config) -> Tokenizer:
    return load_tokenizer(
        data_config.tokenizer,
        bos_token=data_config.bos_token,
        eos_token=data_config.eos_token,
        pad_token=data_config.pad_token,
    )
