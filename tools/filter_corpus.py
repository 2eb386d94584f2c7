"""Swallow's Japanese quality filter (and optional MinHash-LSH near-duplicate removal) over JSONL corpora.

    python tools/filter_corpus.py crawl/*.jsonl --output clean/ja.jsonl --dedup
    python tools/filter_corpus.py in.jsonl --output out.jsonl --set min_letters=300 --rejected why.jsonl

Kept records are written whole with the text normalised ('．，' -> '。、'); a JSON report (default
OUT.report.json) counts rejections per rule, duplicates removed and bad input records. Thresholds are
the fields of plamo_jax.data.quality.QualitySettings, changed with --set NAME=VALUE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plamo_jax import cli
from plamo_jax.data.minhash import MinHasher
from plamo_jax.data.quality import QualityFilter, QualitySettings, filter_jsonl
from plamo_jax.errors import DataError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("inputs", nargs="+", help="JSONL files or directories searched for them")
    parser.add_argument("--output", required=True, help="JSONL file of the kept records")
    parser.add_argument("--report", default="", help="JSON report path (default: OUTPUT with .report.json)")
    parser.add_argument("--rejected", default="", help="also write rejected records, with reasons, here")
    parser.add_argument("--dedup", action="store_true", help="MinHash-LSH near-duplicate removal")
    parser.add_argument("--dedup-ngram", type=int, default=5, help="character n-gram length of shingles")
    parser.add_argument("--dedup-bands", type=int, default=20)
    parser.add_argument("--dedup-rows", type=int, default=40)
    parser.add_argument("--dedup-seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a QualitySettings threshold (repeatable)")
    parser.add_argument("--ng-words", default="", help="file of NG words, one a line (enables that rule)")
    parser.add_argument("--blocked-domains", default="", help="file of blocked domains, one a line")
    parser.add_argument("--url-field", default="url", help="record key of the URL (with --blocked-domains)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--on-bad-input", choices=("skip", "fail"), default="skip")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise DataError(f"--set {pair!r}: expected NAME=VALUE")
        overrides[name.strip()] = value.strip()
    return overrides


def _read_list(path: str, flag: str) -> list[str]:
    if not path:
        return []
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{flag} {path}: cannot read a UTF-8 list, one entry a line ({error})") from error


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = QualitySettings().with_overrides(_parse_overrides(args.set))
    quality_filter = QualityFilter(settings, ng_words=_read_list(args.ng_words, "--ng-words"))
    blocked = _read_list(args.blocked_domains, "--blocked-domains")
    hasher = (MinHasher(args.dedup_ngram, args.dedup_bands, args.dedup_rows, args.dedup_seed)
              if args.dedup else None)
    report = filter_jsonl(
        args.inputs, args.output, quality_filter=quality_filter, dedup=hasher, text_field=args.text_field,
        url_field=args.url_field if blocked else "", blocked_domains=blocked,
        on_bad_input=args.on_bad_input, rejected_output=args.rejected or None,
        show_progress=not args.no_progress,
    )
    report_path = Path(args.report) if args.report else Path(args.output).with_suffix(".report.json")
    report_json = json.dumps(report.to_dict(), ensure_ascii=False, indent=2)
    report_path.write_text(report_json + "\n", encoding="utf-8")
    fired = {reason: count for reason, count in report.rejections_by_reason.items() if count}
    print(f"{args.output}: kept {report.kept} of {report.read.documents} documents; rejected "
          f"{report.rejected} {fired}; duplicates removed {report.duplicates_removed}")
    print(f"input: {report.read.summary()}; report: {report_path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
