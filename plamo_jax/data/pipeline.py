"""The training input pipeline: corpora -> packed rows -> this process' slice of each global batch.

Global row k of step s (with global batch B) is row s * B + k of a fixed endless sequence that is
a pure function of the seed and the data config (see packing.py and mixture.py). Process p of P
reads rows [p * B / P, (p + 1) * B / P) of each step and nothing else, so the global batches do
not depend on the number of processes and the iterator state is just a row counter. Grain runs
the reading: a MapDataset over row indices, mapped to rows, batched, prefetched by threads and
optionally by worker processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags

from plamo_jax.data.documents import TokenDocuments
from plamo_jax.data.formats import TEXT_ONLY, CorpusFormat
from plamo_jax.data.megatron import parse_blend
from plamo_jax.data.mixture import MixtureSchedule
from plamo_jax.data.packing import PACKING_CHOICES, PackedRows
from plamo_jax.data.sources import ReadReport, check_on_bad_input
from plamo_jax.data.tokenizer import Tokenizer, tokenizer_from_config
from plamo_jax.errors import DataError

STATE_VERSION = 1
_ENDLESS_ROWS = 1 << 50  # Grain datasets need a length; no run reads this many rows


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    path: str
    weight: float
    format: str = ""  # from a `<format>:` prefix such as `chat:`; "" = data.format


def parse_sources(source: str, format_names: Sequence[str] = ()) -> list[CorpusSpec]:
    """`[format:]path[:weight],...` -> specs; a weight defaults to 1, a format to data.format.

    A prefix naming one of `format_names` (e.g. `chat:`, `text:`) mixes formats in one run, e.g. SFT
    conversations with some pre-training text so the model does not forget it. An entry that is a
    Megatron-LM blend (`0.3 PREFIX_A 0.7 PREFIX_B`) stands for `megatron:PREFIX_A:0.3,megatron:PREFIX_B:0.7`.
    """
    specs = []
    for item in (part.strip() for part in source.split(",")):
        if not item:
            raise DataError(f"data.source={source!r} has an empty entry; expected 'path[:weight],...'")
        blend = parse_blend(item)
        if blend is not None:
            specs.extend(CorpusSpec(path=path, weight=weight) for path, weight in blend)
            continue
        path, weight = item, 1.0
        head, separator, tail = item.rpartition(":")
        if separator and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass  # a colon inside the path, e.g. seqio:task
        if not (weight > 0 and math.isfinite(weight)):
            raise DataError(f"data.source entry {item!r} has weight {weight}; expected a finite number > 0")
        corpus_format = ""
        for prefix in format_names:
            if path.startswith(prefix + ":"):
                corpus_format, path = prefix, path[len(prefix) + 1 :]
        specs.append(CorpusSpec(path=path, weight=weight, format=corpus_format))
    return specs


def validate_data_config(data_config: ml_collections.ConfigDict,
                         formats: Mapping[str, CorpusFormat] = TEXT_ONLY) -> None:
    """Check every data key once at start; errors name the key, the value and what was expected."""
    validate_reading(data_config)
    for spec in parse_sources(data_config.source, tuple(formats)):
        corpus_format(spec, data_config, formats).validate(data_config)


def validate_reading(data_config: ml_collections.ConfigDict) -> None:
    """The keys every reader uses, whatever the format."""
    check_on_bad_input(data_config.on_bad_input)
    if data_config.packing not in PACKING_CHOICES:
        raise DataError(f"data.packing={data_config.packing!r}; expected one of {PACKING_CHOICES}")
    for key in ("mixture_block_rows", "num_threads", "prefetch_batches"):
        if int(data_config[key]) < 1:
            raise DataError(f"data.{key}={data_config[key]}; expected >= 1")
    if int(data_config.worker_count) < 0:
        raise DataError(f"data.worker_count={data_config.worker_count}; expected >= 0")


def corpus_format(spec: CorpusSpec, data_config: ml_collections.ConfigDict,
                  formats: Mapping[str, CorpusFormat]) -> CorpusFormat:
    name = spec.format or data_config.format
    if name not in formats:
        raise DataError(f"data.format={name!r} for data.source entry {spec.path!r}; expected one of "
                        f"{tuple(formats)} here")
    return formats[name]


@dataclasses.dataclass
class Corpus:
    spec: CorpusSpec
    documents: TokenDocuments
    read_report: ReadReport
    description: str


def load_corpus(spec: CorpusSpec, tokenizer: Tokenizer, data_config: ml_collections.ConfigDict,
                formats: Mapping[str, CorpusFormat] = TEXT_ONLY) -> Corpus:
    read = corpus_format(spec, data_config, formats).read(spec.path, tokenizer, data_config)
    return Corpus(spec, read.documents, read.report, read.description)


class GlobalRows:
    """Global row index -> batch fields, mixing corpora; picklable for Grain worker processes."""

    def __init__(
        self,
        corpora: list[Corpus],
        data_config: ml_collections.ConfigDict,
        *,
        seq_len: int,
        seed: int,
        pad_id: int,
    ):
        self.packed = [
            PackedRows(
                corpus.documents,
                seq_len=seq_len,
                seed=seed,
                stream_id=index,
                shuffle=bool(data_config.shuffle),
                packing=data_config.packing,
                pad_id=pad_id,
                shuffle_rows=bool(data_config.shuffle_rows),
            )
            for index, corpus in enumerate(corpora)
        ]
        self.schedule = MixtureSchedule(
            [corpus.spec.weight for corpus in corpora],
            seed=seed,
            block_rows=int(data_config.mixture_block_rows),
        )

    def __len__(self) -> int:
        return _ENDLESS_ROWS

    def __getitem__(self, global_row: int) -> dict[str, np.ndarray]:
        corpus, corpus_row = self.schedule.assign(int(global_row))
        return self.packed[corpus][corpus_row]


class _LocalRowReader:
    """Local row r (in order of this process' batches) -> the global row it is -> its fields."""

    def __init__(
        self,
        rows: GlobalRows,
        first_row: int,
        global_batch_size: int,
        local_batch_size: int,
        process_index: int,
    ):
        self.rows = rows
        self.first_row = first_row
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index

    def global_row(self, local_row: int) -> int:
        step, within = divmod(local_row, self.local_batch_size)
        return (
            self.first_row
            + step * self.global_batch_size
            + self.process_index * self.local_batch_size
            + within
        )

    def __call__(self, local_row: int) -> dict[str, np.ndarray]:
        return self.rows[self.global_row(local_row)]


@dataclasses.dataclass
class PackingStats:
    """Running totals over the batches this process has yielded."""

    rows: int = 0
    tokens: int = 0  # input positions, padding included
    real_tokens: int = 0  # input positions holding a document token
    loss_tokens: int = 0  # positions whose target counts in the loss
    segments: int = 0  # document pieces (a document split across rows counts once per row)
    rows_per_corpus: list[int] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        total = max(self.tokens, 1)
        rows = max(self.rows, 1)
        corpus_rows = max(sum(self.rows_per_corpus), 1)
        return {
            **dataclasses.asdict(self),
            "packing_efficiency": self.real_tokens / total,
            "loss_token_fraction": self.loss_tokens / total,
            "segments_per_row": self.segments / rows,
            "token_share_per_corpus": [count / corpus_rows for count in self.rows_per_corpus],
        }


def _mark_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; a launcher that does not use absl never parsed them."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """This process' rows of each global batch; state is the number of global rows consumed.

    formats: the corpus formats this iterator may read (default: plain text only).
    batch_sizes: step -> global batch size, for a batch-size ramp (default: global_batch_size always);
    the rows of step s are still rows [sum of the earlier sizes, + size of s), so resume stays exact.
    """

    def __init__(
        self,
        data_config: ml_collections.ConfigDict,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        formats: Mapping[str, CorpusFormat] = TEXT_ONLY,
        batch_sizes: Callable[[int], int] | None = None,
    ):
        self.formats = dict(formats)
        self._batch_size_at = batch_sizes
        self._validate(data_config)
        if global_batch_size < 1 or process_count < 1 or global_batch_size % process_count:
            raise DataError(
                f"train.global_batch_size={global_batch_size} must be a positive multiple of the "
                f"process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index}; expected 0 <= index < {process_count}")
        self.data_config = data_config
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.tokenizer = tokenizer_from_config(data_config)
        self.rows = self._load_rows()
        self.fingerprint = self._fingerprint()
        self.step = 0
        self.rows_consumed = 0  # global rows before the next batch
        self.packing_stats = PackingStats(rows_per_corpus=[0] * self.corpus_count)
        self._iterator: Iterator | None = None

    def _validate(self, data_config: ml_collections.ConfigDict) -> None:
        validate_data_config(data_config, self.formats)

    def _load_rows(self):
        """Read the corpora; the global row index -> batch fields mapping the batches are cut from."""
        config = self.data_config
        self.corpora = [load_corpus(spec, self.tokenizer, config, self.formats)
                        for spec in parse_sources(config.source, tuple(self.formats))]
        pad_id = self.tokenizer.pad_id
        return GlobalRows(self.corpora, config, seq_len=self.seq_len, seed=self.seed, pad_id=pad_id)

    @property
    def corpus_count(self) -> int:
        return len(self.corpora)

    def _fingerprint(self) -> str:
        description = {
            "source": self.data_config.source,
            "tokenizer": self.tokenizer.fingerprint(),
            "add_bos": bool(self.data_config.add_bos),
            "shuffle": bool(self.data_config.shuffle),
            "packing": self.data_config.packing,
            "format": self.data_config.format,
            "chat_template": self.data_config.chat_template,
            "mixture_block_rows": int(self.data_config.mixture_block_rows),
            "documents": [[c.documents.num_documents, c.documents.total_tokens] for c in self.corpora],
        }
        if any(packed.shuffle_block_rows for packed in getattr(self.rows, "packed", ())):
            # Only when it changes the rows: runs started before row shuffling keep their fingerprint.
            description["shuffle_rows"] = True
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def read_report(self) -> ReadReport:
        report = ReadReport()
        for corpus in self.corpora:
            report.merge(corpus.read_report)
        return report

    def dataset(self, first_row: int) -> grain.IterDataset:
        """Grain pipeline yielding this process' batches, starting at global row `first_row`."""
        read_row = _LocalRowReader(
            self.rows, first_row, self.global_batch_size, self.local_batch_size, self.process_index
        )
        dataset = (
            grain.MapDataset.range(0, _ENDLESS_ROWS)
            .map(read_row)
            .batch(self.local_batch_size, drop_remainder=True)
            .to_iter_dataset(
                grain.ReadOptions(
                    num_threads=int(self.data_config.num_threads),
                    # Grain runs at most prefetch_buffer_size reads at once.
                    prefetch_buffer_size=max(
                        int(self.data_config.prefetch_batches), int(self.data_config.num_threads)
                    ),
                )
            )
        )
        if int(self.data_config.worker_count) > 0:
            _mark_absl_flags_parsed()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=int(self.data_config.worker_count))
            )
        return dataset

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batch_size_at is not None:
            self._resize(int(self._batch_size_at(self.step)))
        if self._iterator is None:
            self._iterator = iter(self.dataset(self.rows_consumed))
        batch = next(self._iterator)
        self._account(batch)
        self.rows_consumed += self.global_batch_size
        self.step += 1
        return batch

    def _resize(self, global_batch_size: int) -> None:
        """Batches of another size from here on (the reading pipeline is rebuilt at the current row)."""
        if global_batch_size == self.global_batch_size:
            return
        if global_batch_size < 1 or global_batch_size % self.process_count:
            raise DataError(f"a global batch of {global_batch_size} rows at step {self.step}: expected a "
                            f"positive multiple of the process count {self.process_count}")
        self.close()
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count

    def _account(self, batch: dict[str, np.ndarray]) -> None:
        stats = self.packing_stats
        stats.rows += self.local_batch_size
        stats.tokens += batch["input_ids"].size
        stats.real_tokens += int(np.count_nonzero(batch["segment_ids"]))
        stats.loss_tokens += int(batch["loss_mask"].sum())
        stats.segments += int(batch["segment_ids"].max(axis=1).sum())
        first = self.rows_consumed + self.process_index * self.local_batch_size
        for global_row in range(first, first + self.local_batch_size):
            stats.rows_per_corpus[self.rows.schedule.assign(global_row)[0]] += 1

    def stats(self) -> dict:
        """Packing statistics so far plus the corpora's sizes and read reports."""
        return {
            **self.packing_stats.to_dict(),
            "corpora": [
                {
                    "source": corpus.spec.path,
                    "weight": float(weight),
                    "documents": corpus.documents.num_documents,
                    "tokens_per_epoch": corpus.documents.total_tokens,
                    "rows_per_epoch": packed.rows_per_epoch,
                    "truncated_documents": packed.truncated_documents,
                    "read_report": corpus.read_report.to_dict(),
                }
                for corpus, packed, weight in zip(
                    self.corpora, self.rows.packed, self.rows.schedule.weights, strict=True
                )
            ],
        }

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "rows_consumed": self.rows_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "fingerprint": self.fingerprint,
        }

    def set_state(self, state: dict) -> None:
        """Resume after `state["rows_consumed"]` global rows; the process count and batch size may differ."""
        for key, expected in (
            ("version", STATE_VERSION),
            ("seed", self.seed),
            ("seq_len", self.seq_len),
            ("fingerprint", self.fingerprint),
        ):
            if state.get(key) != expected:
                raise DataError(
                    f"data iterator state has {key}={state.get(key)!r} but this run has {expected!r}; "
                    "the data config, corpus, seed or seq_len changed since the checkpoint (a run started "
                    "before data.shuffle_rows existed continues with data.shuffle_rows=False)"
                )
        self.close()
        self.rows_consumed = int(state["rows_consumed"])
        self.step = int(state["step"])

    def global_batch(self, rows_consumed: int) -> dict[str, np.ndarray]:
        """The whole global batch starting at a row (for tests and debugging; reads every row)."""
        rows = [self.rows[rows_consumed + k] for k in range(self.global_batch_size)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def close(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
