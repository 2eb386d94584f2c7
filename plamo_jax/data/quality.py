"""Swallow's Japanese web-text quality filter: measurements, rules with named thresholds, reasons.

`measure(text)` computes every quantity once; `rejection_reasons(stats, settings)` lists the rules a
document breaks (empty = keep). Definitions where the Swallow description leaves room:
- letters: non-whitespace characters. Japanese letters: hiragana, katakana (incl. the long-vowel mark
  and half-width forms), kanji (incl. 々 〆) and Japanese punctuation (CJK symbols block, ・, full-width
  punctuation). Fractions of hiragana and katakana are over Japanese letters.
- sentences: each line split after 。！？!? (with closing brackets), stripped, empty ones dropped;
  a line without a terminator is one sentence. Length = characters of the stripped sentence.
- duplicate lines / sentences: occurrences after the first, over all (non-empty, stripped) items by
  count (limit 0.30 each), and by characters over the characters of all items (limit 0.20 each; the
  description's "> 0.20 (by characters)" is read as applying to lines and to sentences, as Gopher's
  repetition rules do for lines and paragraphs).
- n-grams are character n-grams of the text with whitespace removed. Top n-gram share = occurrences of
  the most common n-gram / all n-gram occurrences. Duplicate n-gram ratio = distinct n-grams occurring
  more than once / distinct n-grams.
- NG words (optional list): characters covered by NG-word occurrences / letters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tqdm

from plamo_jax.data.minhash import MinHasher, NearDuplicateIndex, char_ngram_hashes, code_points
from plamo_jax.data.sources import JSONL_SUFFIXES, ReadReport, check_on_bad_input, list_input_files
from plamo_jax.errors import DataError

TOP_NGRAM_SIZES = (2, 3, 4)
DUPLICATE_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)
RULE_NAMES = (
    "too_few_letters", "too_few_japanese_letters", "low_hiragana_fraction", "high_katakana_fraction",
    "low_japanese_fraction", "short_mean_sentence", "long_mean_sentence", "long_sentence",
    "ellipsis_sentences", "duplicate_lines", "duplicate_sentences", "duplicate_line_chars",
    "duplicate_sentence_chars", *(f"top_{n}gram_share" for n in TOP_NGRAM_SIZES),
    *(f"duplicate_{n}gram_ratio" for n in DUPLICATE_NGRAM_SIZES), "ng_words",
)
_FULLWIDTH_PUNCT_TO_JAPANESE = str.maketrans({"．": "。", "，": "、"})
_SENTENCE = re.compile(r"[^。！？!?]*[。！？!?]+[」』）)\]】]*|[^。！？!?]+$")


def normalize_punctuation(text: str) -> str:
    """Full-width period and comma ('．，', used in technical writing) become '。、'."""
    return text.translate(_FULLWIDTH_PUNCT_TO_JAPANESE)


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """Every threshold of the filter; a document breaking any rule is rejected with that rule's reason."""

    min_letters: int = 400
    min_japanese_letters: int = 400
    min_hiragana_fraction: float = 0.2
    max_katakana_fraction: float = 0.5
    min_japanese_fraction: float = 0.5
    min_mean_sentence_length: float = 20.0
    max_mean_sentence_length: float = 90.0
    max_sentence_length: int = 200
    ellipsis_endings: str = "・…"
    max_ellipsis_sentence_fraction: float = 0.2
    max_duplicate_line_fraction: float = 0.30
    max_duplicate_sentence_fraction: float = 0.30
    max_duplicate_line_char_fraction: float = 0.20
    max_duplicate_sentence_char_fraction: float = 0.20
    max_top_2gram_share: float = 0.20
    max_top_3gram_share: float = 0.18
    max_top_4gram_share: float = 0.16
    max_duplicate_5gram_ratio: float = 0.15
    max_duplicate_6gram_ratio: float = 0.14
    max_duplicate_7gram_ratio: float = 0.13
    max_duplicate_8gram_ratio: float = 0.12
    max_duplicate_9gram_ratio: float = 0.11
    max_duplicate_10gram_ratio: float = 0.10
    max_ng_word_fraction: float = 0.05  # our default; applies only when an NG-word list is given
    normalize_punctuation: bool = True

    def with_overrides(self, overrides: dict[str, str], flag: str = "--set") -> QualitySettings:
        """A copy with `name=value` strings applied; unknown names or unparsable values raise DataError."""
        fields = {field.name: field for field in dataclasses.fields(self)}
        changes: dict[str, object] = {}
        for name, raw in overrides.items():
            if name not in fields:
                raise DataError(f"{flag} {name}={raw}: unknown setting; expected one of {sorted(fields)}")
            kind = type(getattr(self, name))
            try:
                if kind is bool:
                    if raw.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(raw)
                    changes[name] = raw.lower() in ("true", "1")
                else:
                    changes[name] = kind(raw)
            except ValueError:
                raise DataError(f"{flag} {name}={raw}: expected a value of type {kind.__name__}") from None
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class DocumentStats:
    letters: int
    japanese_letters: int
    hiragana: int
    katakana: int
    sentence_lengths: list[int]
    ellipsis_sentences: int  # sentences ending in one of QualitySettings.ellipsis_endings
    duplicate_line_fraction: float
    duplicate_line_char_fraction: float
    duplicate_sentence_fraction: float
    duplicate_sentence_char_fraction: float
    top_ngram_share: dict[int, float]
    duplicate_ngram_ratio: dict[int, float]
    ng_word_fraction: float = 0.0

    @staticmethod
    def _fraction(part: float, whole: float) -> float:
        return part / whole if whole else 0.0

    @property
    def hiragana_fraction(self) -> float:
        return self._fraction(self.hiragana, self.japanese_letters)

    @property
    def katakana_fraction(self) -> float:
        return self._fraction(self.katakana, self.japanese_letters)

    @property
    def japanese_fraction(self) -> float:
        return self._fraction(self.japanese_letters, self.letters)

    @property
    def mean_sentence_length(self) -> float:
        return self._fraction(sum(self.sentence_lengths), len(self.sentence_lengths))

    @property
    def longest_sentence(self) -> int:
        return max(self.sentence_lengths, default=0)

    @property
    def ellipsis_sentence_fraction(self) -> float:
        return self._fraction(self.ellipsis_sentences, len(self.sentence_lengths))


def _in_ranges(points: np.ndarray, ranges: Iterable[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(points.shape, dtype=bool)
    for low, high in ranges:
        mask |= (points >= low) & (points <= high)
    return mask


_HIRAGANA = ((0x3041, 0x309F),)
_KATAKANA = ((0x30A1, 0x30FA), (0x30FC, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))
_KANJI = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F), (0x3005, 0x3007))
_JAPANESE_PUNCTUATION = (
    (0x3001, 0x3004), (0x3008, 0x303F), (0x30FB, 0x30FB), (0xFF01, 0xFF0F), (0xFF1A, 0xFF20),
    (0xFF3B, 0xFF40), (0xFF5B, 0xFF65),
)


def split_sentences(text: str) -> list[str]:
    sentences = []
    for line in text.splitlines():
        for match in _SENTENCE.findall(line):
            sentence = match.strip()
            if sentence:
                sentences.append(sentence)
    return sentences


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(repeated occurrences / items, their characters / all characters); first occurrences do not count."""
    seen: set[str] = set()
    duplicates = duplicate_chars = 0
    for item in items:
        if item in seen:
            duplicates += 1
            duplicate_chars += len(item)
        else:
            seen.add(item)
    total_chars = sum(len(item) for item in items)
    return (duplicates / len(items) if items else 0.0,
            duplicate_chars / total_chars if total_chars else 0.0)


def ngram_repetition(points: np.ndarray, n: int) -> tuple[float, float]:
    """(share of the most common n-gram among all occurrences, distinct repeated / distinct n-grams)."""
    hashes = char_ngram_hashes(points, n)
    if len(hashes) == 0:
        return 0.0, 0.0
    _, counts = np.unique(hashes, return_counts=True)
    return float(counts.max() / len(hashes)), float(np.count_nonzero(counts > 1) / len(counts))


def ng_word_fraction(text: str, ng_word_pattern: re.Pattern[str] | None, letters: int) -> float:
    if ng_word_pattern is None or not letters:
        return 0.0
    covered = np.zeros(len(text), dtype=bool)
    for match in ng_word_pattern.finditer(text):
        covered[match.start() : match.end()] = True
    return float(np.count_nonzero(covered)) / letters


def compile_ng_words(words: Iterable[str]) -> re.Pattern[str] | None:
    words = sorted({word.strip() for word in words if word.strip()}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, words))) if words else None


def measure(
    text: str, *, ellipsis_endings: str = "・…", ng_word_pattern: re.Pattern[str] | None = None
) -> DocumentStats:
    points = code_points(text)
    hiragana = _in_ranges(points, _HIRAGANA)
    katakana = _in_ranges(points, _KATAKANA)
    japanese = hiragana | katakana | _in_ranges(points, _KANJI) | _in_ranges(points, _JAPANESE_PUNCTUATION)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    sentences = split_sentences(text)
    line_dup, line_dup_chars = duplicate_fractions(lines)
    sentence_dup, sentence_dup_chars = duplicate_fractions(sentences)
    repetition = {n: ngram_repetition(points, n) for n in (*TOP_NGRAM_SIZES, *DUPLICATE_NGRAM_SIZES)}
    letters = len(points)
    return DocumentStats(
        letters=letters,
        japanese_letters=int(np.count_nonzero(japanese)),
        hiragana=int(np.count_nonzero(hiragana)),
        katakana=int(np.count_nonzero(katakana)),
        sentence_lengths=[len(sentence) for sentence in sentences],
        ellipsis_sentences=sum(1 for sentence in sentences if sentence[-1] in ellipsis_endings),
        duplicate_line_fraction=line_dup,
        duplicate_line_char_fraction=line_dup_chars,
        duplicate_sentence_fraction=sentence_dup,
        duplicate_sentence_char_fraction=sentence_dup_chars,
        top_ngram_share={n: repetition[n][0] for n in TOP_NGRAM_SIZES},
        duplicate_ngram_ratio={n: repetition[n][1] for n in DUPLICATE_NGRAM_SIZES},
        ng_word_fraction=ng_word_fraction(text, ng_word_pattern, letters),
    )


def rejection_reasons(stats: DocumentStats, settings: QualitySettings) -> list[str]:
    """Names of the rules `stats` breaks, in the order the Swallow description lists them."""
    s = settings
    checks = [
        ("too_few_letters", stats.letters < s.min_letters),
        ("too_few_japanese_letters", stats.japanese_letters < s.min_japanese_letters),
        ("low_hiragana_fraction", stats.hiragana_fraction < s.min_hiragana_fraction),
        ("high_katakana_fraction", stats.katakana_fraction > s.max_katakana_fraction),
        ("low_japanese_fraction", stats.japanese_fraction < s.min_japanese_fraction),
        ("short_mean_sentence", stats.mean_sentence_length < s.min_mean_sentence_length),
        ("long_mean_sentence", stats.mean_sentence_length > s.max_mean_sentence_length),
        ("long_sentence", stats.longest_sentence > s.max_sentence_length),
        ("ellipsis_sentences", stats.ellipsis_sentence_fraction > s.max_ellipsis_sentence_fraction),
        ("duplicate_lines", stats.duplicate_line_fraction > s.max_duplicate_line_fraction),
        ("duplicate_sentences", stats.duplicate_sentence_fraction > s.max_duplicate_sentence_fraction),
        ("duplicate_line_chars", stats.duplicate_line_char_fraction > s.max_duplicate_line_char_fraction),
        ("duplicate_sentence_chars",
         stats.duplicate_sentence_char_fraction > s.max_duplicate_sentence_char_fraction),
    ]
    for n in TOP_NGRAM_SIZES:
        checks.append((f"top_{n}gram_share", stats.top_ngram_share[n] > getattr(s, f"max_top_{n}gram_share")))
    for n in DUPLICATE_NGRAM_SIZES:
        limit = getattr(s, f"max_duplicate_{n}gram_ratio")
        checks.append((f"duplicate_{n}gram_ratio", stats.duplicate_ngram_ratio[n] > limit))
    checks.append(("ng_words", stats.ng_word_fraction > s.max_ng_word_fraction))
    return [reason for reason, broken in checks if broken]


class QualityFilter:
    """`check(text) -> (text after normalisation, reasons)`; an empty reason list means keep."""

    def __init__(self, settings: QualitySettings | None = None, ng_words: Iterable[str] = ()):
        self.settings = settings or QualitySettings()
        self._ng_word_pattern = compile_ng_words(ng_words)

    def measure(self, text: str) -> DocumentStats:
        return measure(text, ellipsis_endings=self.settings.ellipsis_endings,
                       ng_word_pattern=self._ng_word_pattern)

    def check(self, text: str) -> tuple[str, list[str]]:
        if self.settings.normalize_punctuation:
            text = normalize_punctuation(text)
        return text, rejection_reasons(self.measure(text), self.settings)


# --- streaming JSONL job (tools/filter_corpus.py) ---------------------------------------------

BLOCKED_URL = "blocked_url"


def url_is_blocked(url: str, blocked_domains: frozenset[str]) -> bool:
    """True when the URL's host or any parent domain of it is in `blocked_domains`."""
    host = urllib.parse.urlsplit(url if "//" in url else f"//{url}").hostname or ""
    parts = host.lower().split(".")
    return any(".".join(parts[i:]) in blocked_domains for i in range(len(parts)))


@dataclasses.dataclass
class FilterReport:
    """What happened to every record: read problems, per-rule rejections, duplicates, kept documents."""

    read: ReadReport = dataclasses.field(default_factory=ReadReport)
    kept: int = 0
    rejected: int = 0
    rejections_by_reason: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys((*RULE_NAMES, BLOCKED_URL), 0)
    )
    duplicates_removed: int = 0
    settings: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "documents_read": self.read.documents,
            "kept": self.kept,
            "rejected_by_quality": self.rejected,
            "duplicates_removed": self.duplicates_removed,
            "rejections_by_reason": self.rejections_by_reason,
            "bad_records": self.read.to_dict(),
            "settings": self.settings,
        }


def _iter_records(path: Path, text_field: str, report: ReadReport, on_bad_input: str,
                  progress) -> Iterator[tuple[dict, str, str]]:
    """(record, text, location) per usable JSONL line; unusable ones are counted in `report`."""
    with open(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            progress.update(len(raw_line))
            if not raw_line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(raw_line.decode("utf-8"))
            except UnicodeDecodeError as error:
                report.bad("invalid_utf8", where, str(error), on_bad_input)
                continue
            except json.JSONDecodeError as error:
                report.bad("bad_json", where, str(error), on_bad_input)
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                detail = f"no string field {text_field!r} (--text-field)"
                report.bad("missing_field", where, detail, on_bad_input)
                continue
            if not text.strip():
                report.bad("empty_document", where, "the text is empty or only whitespace", on_bad_input)
                continue
            report.documents += 1
            report.text_bytes += len(text.encode("utf-8"))
            yield record, text, where


def filter_jsonl(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    quality_filter: QualityFilter,
    dedup: MinHasher | None = None,
    text_field: str = "text",
    url_field: str = "",
    blocked_domains: Iterable[str] = (),
    on_bad_input: str = "skip",
    rejected_output: str | Path | None = None,
    show_progress: bool = True,
) -> FilterReport:
    """Stream JSONL records through the quality filter (then MinHash-LSH if `dedup`), writing kept ones.

    Kept records are written whole, their text normalised; `rejected_output` gets the others with a
    `rejection_reasons` list (or `duplicate_of`: the output line of the kept document they repeat).
    The output appears only once complete (written to a temporary name, then renamed).
    """
    check_on_bad_input(on_bad_input)
    report = FilterReport(settings=dataclasses.asdict(quality_filter.settings))
    if dedup is not None:
        report.settings["dedup"] = {"ngram": dedup.ngram, "bands": dedup.bands, "rows": dedup.rows,
                                    "seed": dedup.seed}
    blocked = frozenset(domain.strip().lower() for domain in blocked_domains if domain.strip())
    index = NearDuplicateIndex(dedup) if dedup is not None else None
    files = []
    for file in (file for path in inputs for file in list_input_files(path, report.read, on_bad_input)):
        if file.suffix in JSONL_SUFFIXES:
            files.append(file)
        else:
            expected = f"expected JSONL ({JSONL_SUFFIXES})"
            report.read.bad("unsupported_format", str(file), expected, on_bad_input)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with contextlib.ExitStack() as stack:
        kept_file = stack.enter_context(open(partial, "w", encoding="utf-8"))
        rejected_file = (stack.enter_context(open(rejected_output, "w", encoding="utf-8"))
                         if rejected_output else None)
        progress = stack.enter_context(tqdm.tqdm(
            total=sum(file.stat().st_size for file in files), unit="B", unit_scale=True,
            desc="filter_corpus", disable=not show_progress,
        ))
        for file in files:
            for record, text, where in _iter_records(file, text_field, report.read, on_bad_input, progress):
                text, reasons = quality_filter.check(text)
                url = record.get(url_field) if url_field else None
                if blocked and isinstance(url, str) and url_is_blocked(url, blocked):
                    reasons.append(BLOCKED_URL)
                verdict: dict = {}
                if reasons:
                    report.rejected += 1
                    for reason in reasons:
                        report.rejections_by_reason[reason] += 1
                    verdict = {"rejection_reasons": reasons}
                elif index is not None and (kept_line := index.find_duplicate(text)) is not None:
                    report.duplicates_removed += 1
                    verdict = {"duplicate_of": kept_line + 1}
                record = {**record, text_field: text}
                if not verdict:
                    kept_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                    report.kept += 1
                elif rejected_file is not None:
                    rejected_file.write(json.dumps({**record, **verdict, "source": where},
                                                   ensure_ascii=False) + "\n")
            progress.set_postfix(kept=report.kept, rejected=report.rejected,
                                 duplicates=report.duplicates_removed)
    partial.replace(output)
    return report
