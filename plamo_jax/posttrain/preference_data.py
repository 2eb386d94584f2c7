"""Preference pairs for DPO: each global row is one (chosen, rejected) pair, both rendered from one prompt.

A preference corpus is JSONL: {"prompt": str | [messages], "chosen": str | [messages],
"rejected": str | [messages]}; a string prompt is a user message, a string response an assistant
message (`split_pair` also reads the other common layouts). Only the responses are scored (their
target masks), never the prompt. A pair whose longer sequence exceeds train.seq_len + 1 tokens is
skipped and counted (cutting it would score a truncated response). Rows come from a seeded
permutation per epoch, so like the pre-training iterator the state is a row counter and batches
do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import ml_collections
import numpy as np

from plamo_jax.data import batch
from plamo_jax.data.lru import LruCache
from plamo_jax.data.packing import row_arrays
from plamo_jax.data.pipeline import TrainIterator, parse_sources, validate_reading
from plamo_jax.data.sources import JSONL_SUFFIXES, ReadReport, iter_json_records, list_input_files
from plamo_jax.data.tokenizer import Tokenizer
from plamo_jax.errors import DataError
from plamo_jax.posttrain.sft import (
    ChatTemplate,
    builtin_turns,
    chat_template,
    check_message_list,
    prompt_messages,
    render_conversation,
    validate_chat_keys,
)

BUILTIN_PREFERENCE = "builtin_preference"
PREFERENCE_FORMAT = "preference"  # the data.format of preference pairs
SIDES = ("chosen", "rejected")  # the batch-key prefixes of a pair's two sequences (data/batch.py)


def _as_messages(value: object, default_role: str) -> object:
    return [{"role": default_role, "content": value}] if isinstance(value, str) else value


def split_pair(record: object) -> tuple[list[dict], list[dict], list[dict]] | str:
    """(prompt, chosen, rejected) message lists, or why the record is not a usable pair.

    Accepts the common public layouts: a separate "prompt" (string or messages) with responses that
    either follow it or repeat it first (UltraFeedback-style), or no "prompt" and two whole
    conversations whose shared beginning is the prompt (HH-RLHF-style).
    """
    if not isinstance(record, dict):
        return "not a JSON object"
    for side in SIDES:
        if side not in record:
            return f"no {side!r} field"
        problem = check_message_list(_as_messages(record[side], "assistant"), side)
        if problem is not None:
            return problem
    chosen, rejected = (_as_messages(record[side], "assistant") for side in SIDES)
    if "prompt" in record:
        prompt = _as_messages(record["prompt"], "user")
        problem = check_message_list(prompt, "prompt")
        if problem is not None:
            return problem
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
        if not prompt:
            return "no 'prompt' field and the two conversations share no beginning"
    responses = [r[len(prompt):] if r[: len(prompt)] == prompt else r for r in (chosen, rejected)]
    for side, response in zip(SIDES, responses, strict=True):
        if not any(m["role"] == "assistant" for m in response):
            return f"{side!r} has no assistant message after the prompt to score"
    return prompt, responses[0], responses[1]


def render_pair(
    prompt: list[dict], chosen: list[dict], rejected: list[dict], tokenizer: Tokenizer,
    template: ChatTemplate, add_bos: bool,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(tokens, target mask)] for prompt + chosen and prompt + rejected; only responses are masked in."""
    return [
        render_conversation([*prompt, *response], tokenizer, template, add_bos, first_learned=len(prompt))
        for response in (chosen, rejected)
    ]


class PreferencePairs:
    """Rendered pairs held in memory (preference sets are small), with a read report."""

    def __init__(
        self, source: str, tokenizer: Tokenizer, data_config: ml_collections.ConfigDict, seq_len: int
    ):
        self.report = ReadReport()
        template = chat_template(data_config.chat_template, tokenizer)
        add_bos = bool(data_config.add_bos)
        self.sequences: list[list[tuple[np.ndarray, np.ndarray]]] = []
        for where, messages in self._split_pairs(source, data_config.on_bad_input):
            pair = render_pair(*messages, tokenizer, template, add_bos)
            longest = max(len(tokens) for tokens, _ in pair)
            if longest > seq_len + 1:
                self.report.bad(
                    "too_long", where, f"{longest} tokens > train.seq_len + 1 = {seq_len + 1}",
                    data_config.on_bad_input,
                )
                continue
            self.report.documents += 1
            self.report.text_bytes += sum(len(m["content"].encode()) for part in messages for m in part)
            self.sequences.append(pair)
        if not self.sequences:
            raise DataError(f"data.source={source!r} yielded no preference pairs: {self.report.summary()}")

    def _split_pairs(self, source: str, on_bad_input: str):
        """(where, (prompt, chosen, rejected)) for every usable record; the others are reported."""
        if source == BUILTIN_PREFERENCE:
            for index, pair in enumerate(builtin_preference_pairs()):
                yield f"{BUILTIN_PREFERENCE}:{index}", split_pair(pair)
            return
        files = list_input_files(source, self.report, on_bad_input)
        wrong = [str(f) for f in files if f.suffix not in JSONL_SUFFIXES]
        if wrong:
            raise DataError(f"data.source={source!r}: data.format='preference' reads JSONL; got {wrong[:3]}")
        for path in files:
            yield from self._split_jsonl(path, on_bad_input)

    def _split_jsonl(self, path: Path, on_bad_input: str):
        for where, record in iter_json_records(path, self.report, on_bad_input):
            split = split_pair(record)
            if isinstance(split, str):
                self.report.bad("bad_pair", where, split, on_bad_input)
                continue
            yield where, split

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def total_tokens(self) -> int:
        return sum(len(tokens) for pair in self.sequences for tokens, _ in pair)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for pair in self.sequences:
            for tokens, mask in pair:
                digest.update(tokens.tobytes())
                digest.update(mask.tobytes())
        return digest.hexdigest()[:16]


class PairRows:
    """Global row -> the fields of one pair, `chosen_*` and `rejected_*`, each padded to seq_len."""

    def __init__(self, pairs: PreferencePairs, *, seq_len: int, seed: int, shuffle: bool, pad_id: int):
        self.pairs = pairs
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self._orders = LruCache(3)

    def _order(self, epoch: int) -> np.ndarray:
        def compute(epoch: int) -> np.ndarray:
            if not self.shuffle:
                return np.arange(len(self.pairs))
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

        return self._orders.get_or_compute(epoch, compute)

    def __len__(self) -> int:
        return 1 << 50

    def __getitem__(self, global_row: int) -> dict[str, np.ndarray]:
        epoch, within = divmod(int(global_row), len(self.pairs))
        fields = {}
        pair = self.pairs.sequences[int(self._order(epoch)[within])]
        for side, (tokens, mask) in zip(SIDES, pair, strict=True):
            row = row_arrays(tokens, np.zeros(len(tokens), np.int64), self.seq_len, self.pad_id, mask)
            fields.update({batch.prefixed(side, name): value for name, value in row.items()})
        return fields


class PreferenceIterator(TrainIterator):
    """The pre-training iterator's batching, sharding and resume over preference pairs."""

    corpus_count = 1

    def _validate(self, data_config: ml_collections.ConfigDict) -> None:
        validate_reading(data_config)
        validate_chat_keys(data_config)
        if data_config.format != PREFERENCE_FORMAT:
            raise DataError(f"data.format={data_config.format!r}; expected {PREFERENCE_FORMAT!r} "
                            "(chosen / rejected pairs)")
        if len(parse_sources(data_config.source)) != 1:
            raise DataError(
                f"data.source={data_config.source!r}: data.format='preference' takes one JSONL file or "
                "directory (merge preference sets into one directory)"
            )

    def _load_rows(self) -> PairRows:
        specs = parse_sources(self.data_config.source)
        self.pairs = PreferencePairs(specs[0].path, self.tokenizer, self.data_config, self.seq_len)
        return PairRows(
            self.pairs,
            seq_len=self.seq_len,
            seed=self.seed,
            shuffle=bool(self.data_config.shuffle),
            pad_id=self.tokenizer.pad_id,
        )

    def _fingerprint(self) -> str:
        parts = (self.tokenizer.fingerprint(), self.pairs.fingerprint(), str(bool(self.data_config.shuffle)))
        return "preference-" + "-".join(parts)

    @property
    def read_report(self) -> ReadReport:
        return self.pairs.report

    def _account(self, rows: dict[str, np.ndarray]) -> None:
        stats = self.packing_stats
        stats.rows += self.local_batch_size
        stats.rows_per_corpus[0] += self.local_batch_size
        for side in SIDES:
            fields = batch.sequence(rows, side)
            stats.tokens += fields["input_ids"].size
            stats.real_tokens += int(np.count_nonzero(fields["segment_ids"]))
            stats.loss_tokens += int(fields["loss_mask"].sum())
            stats.segments += self.local_batch_size

    def stats(self) -> dict:
        return {
            **self.packing_stats.to_dict(),
            "corpora": [
                {
                    "source": self.data_config.source,
                    "weight": 1.0,
                    "documents": len(self.pairs),
                    "tokens_per_epoch": self.pairs.total_tokens,
                    "rows_per_epoch": float(len(self.pairs)),
                    "truncated_documents": 0,
                    "read_report": self.pairs.report.to_dict(),
                }
            ],
        }


def builtin_preference_pairs(count: int = 2000, seed: int = 1) -> list[dict]:
    """The bundled chat questions: the answer that follows the request (language, form) is chosen."""
    return [
        {"prompt": prompt_messages(question, with_system), "chosen": answer, "rejected": wrong}
        for question, answer, wrong, with_system in builtin_turns(count, seed)
    ]
