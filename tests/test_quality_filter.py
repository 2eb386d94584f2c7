"""Swallow quality filter: every rule fires alone on a document built to break it, ratios match hand
counts, MinHash estimates Jaccard, LSH removes near-duplicates, and the CLI writes kept records + report.

All texts are our own writing. Violating documents are derived from the clean ones by a transformation
that changes one property; where rules are nested by construction (a repeated passage raises every
duplicate n-gram ratio; a repeated line repeats its sentences) the implied companion rules are switched
off through their settings, which the test names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

from plamo_jax import cli
from plamo_jax.data.minhash import MinHasher, NearDuplicateIndex, estimated_jaccard, exact_jaccard
from plamo_jax.data.quality import (
    DUPLICATE_NGRAM_SIZES,
    RULE_NAMES,
    QualityFilter,
    QualitySettings,
    duplicate_fractions,
    measure,
    normalize_punctuation,
    split_sentences,
    url_is_blocked,
)
from plamo_jax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]

LIBRARY = """\
駅の北口から歩いて五分ほどの場所に、古い市立図書館が建っている。
昭和の終わりに建てられたこの建物は、去年の春から半年かけて改修工事が行われた。
工事の間は近くの公民館に仮の窓口が置かれ、予約した本だけを受け取れる仕組みになっていた。
再開の日、入口の前には開館時間より前から小さな列ができていた。
中に入ってまず驚いたのは、天井が高くなり、窓から入る光がずいぶん明るくなったことだ。
以前は薄暗かった閲覧室に、木の机と座り心地のよい椅子が並べられている。
子ども向けの棚は床に近い高さにそろえられ、絵本を表紙が見えるように置く工夫もされていた。
二階には静かに作業ができる部屋が新しく作られ、電源のある席は学生たちにすぐ埋められた。
一方で、郷土資料の部屋は昔のままの姿で残されている。
古い地図や町の写真を眺めていると、川沿いに小さな工場が並んでいた頃の様子が目に浮かぶ。
カウンターの職員によれば、改修の計画を立てるときに住民から多くの意見が寄せられたそうだ。
特に多かったのは、段差をなくしてほしいという声と、雨の日でも自転車を置ける屋根がほしいという声だった。
どちらの願いもかなえられ、入口には緩やかな坂道と屋根つきの駐輪場ができた。
帰り道、借りた三冊の本を抱えながら、次の休みにはどの棚から見て回ろうかと考えた。
"""

PERSIMMONS = """\
祖母の家の裏には、小さな畑と柿の木が一本ある。
秋になると枝がしなるほど実がなり、近所の人たちが脚立を持って手伝いに来てくれる。
渋柿なので、そのままでは食べられない。
皮をむいてひもで吊るし、軒下で一か月ほど風に当てると、甘い干し柿ができあがる。
祖母は毎日それを指でやさしくもみ、中まで均一に乾くように気を配っていた。
冬の初めに届く箱を開けると、白い粉をまとった干し柿がきれいに並んでいる。
一つ口に入れると、ねっとりとした甘さが広がり、子どもの頃の縁側の景色を思い出す。
今年は私も休みを取って、吊るす作業を手伝いに行くつもりだ。
祖母に教わったやり方をノートに書き留めておけば、いつか自分の庭でも作れるかもしれない。
畑の隅では大根や白菜も育っていて、冬の鍋に入れるのが毎年の楽しみになっている。
"""

COMMUTE = """\
朝の通勤電車では、できるだけ窓際に立つようにしている。
川を渡る鉄橋に差しかかると、水面に朝日が反射して車内までまぶしく照らされる。
晴れた日には遠くの山並みがくっきりと見え、冬には頂上が白く染まっているのがわかる。
乗客の多くは手元の画面を見つめているが、ときどき顔を上げて外を眺める人もいる。
同じ車両に乗る年配の男性は、いつも文庫本を開いていて、降りる駅が近づくと丁寧にしおりを挟む。
名前も知らない相手だが、その姿を見ると、今日も一日が始まるのだと感じる。
雨の日は窓に細かな水滴がつき、街の明かりがにじんで見えるのも悪くない。
終点の一つ手前で降りて、会社までの十分ほどの道を歩くのが、私にとって大切な準備の時間になっている。
"""

GADGETS = """\
新しいスマートフォンのカメラアプリには、ポートレートモードとナイトモードのほかにマクロモードがある。
レンズのフォーカスをソフトウェアでコントロールし、シャッタースピードとISOをオートで調整する。
メニューのセッティングからフォーマットをジェイペグかロウデータかセレクトでき、ストレージのスペースもチェックできる。
クラウドサービスにアップロードしたデータは、パソコンのブラウザやタブレットのアプリケーションでダウンロードできる。
バッテリーのパフォーマンスをキープするため、バックグラウンドのプロセスはスリープモードでストップする。
アップデートのインストールはワイファイのネットワークにコネクトしたタイミングでスタートする。
ユーザーインターフェースのデザインはシンプルで、アイコンやボタンのレイアウトはカスタマイズもできる。
アクセサリーショップではケースやフィルムのほか、ワイヤレスイヤホンとスマートウォッチのセットもセールになっていた。
サポートセンターのオペレーターはマニュアルのページをリンクでシェアし、トラブルのシューティングをガイドしてくれた。
"""

ENGLISH = """\
The library near the north exit of the station reopened last month after half a year of work.
Its reading room is brighter now, because the ceiling was raised and the windows were widened.
Children can reach the picture books, which stand on low shelves with their covers facing out.
A quiet room upstairs has desks with power sockets, and students filled them on the first morning.
The local history room was left as it was, with old maps and photographs of the river district.
Residents had asked for a gentle slope at the entrance and a roof over the bicycle stand.
Both requests were granted, and the staff say that visitors have doubled since the reopening.
I walked home with three borrowed books and a plan to explore another shelf next weekend.
"""

SENTENCES = split_sentences(LIBRARY)


def reasons(text: str, **overrides) -> list[str]:
    return QualityFilter(dataclasses.replace(QualitySettings(), **overrides)).check(text)[1]


def kanji(index: int) -> str:
    return chr(0x5000 + index)  # a run of distinct CJK ideographs for synthetic n-gram documents


def periodic(head: str, groups_per_sentence: int = 12, sentences: int = 10) -> str:
    """Sentences of `head` + two fresh kanji, repeated: only n-grams inside `head` recur."""
    lines, next_kanji = [], 0
    for _ in range(sentences):
        groups = []
        for _ in range(groups_per_sentence):
            groups.append(head + kanji(next_kanji) + kanji(next_kanji + 1))
            next_kanji += 2
        lines.append("".join(groups) + "。")
    return "\n".join(lines)


def hiragana_as_kanji(text: str) -> str:
    """A one-to-one substitution: every statistic but the script counts stays as it was."""
    return "".join(chr(ord(c) - 0x3041 + 0x6C00) if 0x3041 <= ord(c) <= 0x3096 else c for c in text)


def rechunk(text: str, length: int) -> str:
    flat = re.sub(r"[。\n]", "", text)
    return "\n".join(flat[i : i + length] + "。" for i in range(0, len(flat), length))


def paired_lines(text: str) -> str:
    """Two sentences per line."""
    sentences = split_sentences(text)
    return "\n".join("".join(sentences[i : i + 2]) for i in range(0, len(sentences), 2))


ALL_NGRAM_RULES_OFF = {f"max_duplicate_{n}gram_ratio": 1.0 for n in DUPLICATE_NGRAM_SIZES}
REPEATED_PASSAGE = LIBRARY + re.sub(r"\n", "", LIBRARY)[5:125] + "\n"

VIOLATIONS = {
    # fewer than 400 letters implies fewer than 400 Japanese letters: that rule is switched off here
    "too_few_letters": ("\n".join(SENTENCES[:6]), {"min_japanese_letters": 0}),
    "too_few_japanese_letters": ("\n".join(SENTENCES[:9] + ENGLISH.splitlines()[:3]), {}),
    "low_hiragana_fraction": (hiragana_as_kanji(LIBRARY), {}),
    "high_katakana_fraction": (GADGETS, {}),
    "low_japanese_fraction": (LIBRARY + ENGLISH, {}),
    "short_mean_sentence": (rechunk(LIBRARY, 15), {}),
    "long_mean_sentence": (rechunk(LIBRARY, 120), {}),
    # the first six sentences joined with commas: 223 characters, the mean stays at 61
    "long_sentence": ("、".join(s[:-1] for s in SENTENCES[:6]) + "。\n" + "\n".join(SENTENCES[6:]), {}),
    # every third sentence ends its line with an ellipsis: 5 of 14
    "ellipsis_sentences": ("\n".join(s[:-1] + "…" if i % 3 == 0 else s for i, s in enumerate(SENTENCES)), {}),
    # 5 copies of a short line among 7 two-sentence lines: 4/12 lines but only 4/19 sentences repeat
    "duplicate_lines": (paired_lines(LIBRARY) + "\nまた来よう。" * 5, {}),
    # every line ends with the same short sentence: 13 of 28 sentences repeat, no line does
    "duplicate_sentences": ("\n".join(s + "本当に。" for s in SENTENCES), {}),
    # four long lines repeated: their sentences and n-grams repeat too (switched off)
    "duplicate_line_chars": (
        LIBRARY + "\n".join(SENTENCES[9:13]),
        {"max_duplicate_sentence_char_fraction": 1.0, **ALL_NGRAM_RULES_OFF},
    ),
    # long sentences repeated inside new lines, so no line repeats; the repeated n-grams are switched off
    "duplicate_sentence_chars": (
        LIBRARY + "\n".join(f"{kanji(i)}{kanji(i + 1)}の話は続く。" + SENTENCES[11 - i] for i in range(4)),
        ALL_NGRAM_RULES_OFF,
    ),
    "top_2gram_share": (periodic("もの"), {}),
    "top_3gram_share": (periodic("かたち"), {}),
    "top_4gram_share": (periodic("はなやか"), {}),
}
for _n in DUPLICATE_NGRAM_SIZES:  # a repeated 120-character passage raises all six ratios together
    VIOLATIONS[f"duplicate_{_n}gram_ratio"] = (
        REPEATED_PASSAGE,
        {key: value for key, value in ALL_NGRAM_RULES_OFF.items() if f"_{_n}gram" not in key},
    )


@pytest.mark.parametrize("text", [LIBRARY, PERSIMMONS + COMMUTE], ids=["library", "persimmons_commute"])
def test_clean_japanese_documents_pass_every_rule(text):
    assert reasons(text) == []


@pytest.mark.parametrize("rule", sorted(VIOLATIONS))
def test_each_rule_fires_alone_on_a_document_built_to_break_it(rule):
    text, overrides = VIOLATIONS[rule]
    assert reasons(text, **overrides) == [rule]


def test_every_rule_but_ng_words_has_a_violation_test():
    assert set(RULE_NAMES) - set(VIOLATIONS) == {"ng_words"}


def test_ng_word_rule_counts_covered_characters():
    # letters: 6 + 3 + 6 = 15; the NG word "ぱぴぷ" (3 letters) covers 3/15 = 0.2
    text = "あいうえおか ぱぴぷ きくけこさし"
    quality_filter = QualityFilter(ng_words=["ぱぴぷ", ""])
    assert quality_filter.measure(text).ng_word_fraction == pytest.approx(3 / 15)
    strict_settings = dataclasses.replace(QualitySettings(), max_ng_word_fraction=0.1)
    strict = QualityFilter(strict_settings, ng_words=["ぱぴぷ"])
    assert "ng_words" in strict.check(text)[1]
    assert QualityFilter().measure(text).ng_word_fraction == 0.0  # no list, no rule


def test_letter_classes_and_fractions_match_hand_counts():
    # hiragana 4 (ひらがな), katakana 5 (カタカナー), kanji 3 (漢字々), punctuation 2 (。・), ASCII 3; spaces
    # are not letters. Japanese = 14, letters = 17.
    stats = measure("ひらがな カタカナー\t漢字々。・abc \u3000")
    assert (stats.letters, stats.japanese_letters, stats.hiragana, stats.katakana) == (17, 14, 4, 5)
    assert stats.hiragana_fraction == pytest.approx(4 / 14)
    assert stats.katakana_fraction == pytest.approx(5 / 14)
    assert stats.japanese_fraction == pytest.approx(14 / 17)


def test_sentence_statistics_match_hand_counts():
    text = "一つ目の文です。「二つ目！」\n  三行目…\n\n四・"
    assert split_sentences(text) == ["一つ目の文です。", "「二つ目！」", "三行目…", "四・"]
    stats = measure(text)
    assert stats.sentence_lengths == [8, 6, 4, 2]
    assert stats.mean_sentence_length == pytest.approx(20 / 4)
    assert stats.longest_sentence == 8
    assert stats.ellipsis_sentence_fraction == pytest.approx(2 / 4)


def test_duplicate_fractions_count_repeats_after_the_first():
    # items a, bb, a, bb, a, ccc: repeats are a, bb, a -> 3/6 by count, (1+2+1)/10 by characters
    assert duplicate_fractions(["a", "bb", "a", "bb", "a", "ccc"]) == (pytest.approx(0.5), pytest.approx(0.4))
    stats = measure("同じ行\n違う行\n 同じ行 \n")
    assert stats.duplicate_line_fraction == pytest.approx(1 / 3)
    assert stats.duplicate_line_char_fraction == pytest.approx(3 / 9)


def test_ngram_shares_and_duplicate_ratios_match_hand_counts():
    # ねこねこねこいぬ: 2-grams ねこ×3 of 7; 3-grams ねこね×2 (and こねこ×2) of 6; 4-grams ねこねこ×2 of 5
    stats = measure("ねこねこ ねこいぬ")
    assert stats.top_ngram_share == {
        2: pytest.approx(3 / 7), 3: pytest.approx(2 / 6), 4: pytest.approx(2 / 5)
    }
    # あいうえおかあいうえおき: 8 five-grams, 7 distinct, あいうえお repeated -> 1/7; 6-grams all distinct
    stats = measure("あいうえおか\nあいうえおき")
    assert stats.duplicate_ngram_ratio[5] == pytest.approx(1 / 7)
    assert stats.duplicate_ngram_ratio[6] == 0.0
    assert measure("短い").duplicate_ngram_ratio[10] == 0.0


def test_fullwidth_period_and_comma_are_normalised_before_filtering():
    assert normalize_punctuation("式（１）は，次のとおり．") == "式（１）は、次のとおり。"
    text = LIBRARY.replace("。", "．").replace("、", "，")
    normalised, rejected_for = QualityFilter().check(text)
    assert normalised == LIBRARY and rejected_for == []
    raw = QualitySettings(normalize_punctuation=False)
    assert QualityFilter(raw).check(text)[0] == text


def test_settings_overrides_are_typed_and_unknown_names_rejected():
    settings = QualitySettings().with_overrides({"min_letters": "300", "max_top_2gram_share": "0.25",
                                                 "normalize_punctuation": "false"})
    assert settings.min_letters == 300 and settings.max_top_2gram_share == 0.25
    assert settings.normalize_punctuation is False
    with pytest.raises(DataError, match="min_leters=3.*unknown setting"):
        QualitySettings().with_overrides({"min_leters": "3"})
    with pytest.raises(DataError, match="min_letters=many.*int"):
        QualitySettings().with_overrides({"min_letters": "many"})


def test_url_block_list_matches_the_host_and_its_parents():
    blocked = frozenset({"spam.example"})
    assert url_is_blocked("https://www.spam.example/page", blocked)
    assert url_is_blocked("spam.example/x", blocked)
    assert not url_is_blocked("https://notspam.example/", blocked)


# --- MinHash ---------------------------------------------------------------------------------------

LONG_DOCUMENT = LIBRARY + PERSIMMONS + COMMUTE
ONE_SENTENCE_CHANGED = LONG_DOCUMENT.replace(
    "渋柿なので、そのままでは食べられない。", "渋い種類なので、生では食べにくい。"
)


@pytest.mark.parametrize(
    "text_b",
    [ONE_SENTENCE_CHANGED, LIBRARY + PERSIMMONS, PERSIMMONS + GADGETS, GADGETS],
    ids=["one_sentence", "two_thirds", "one_shared_passage", "unrelated"],
)
def test_minhash_estimate_is_close_to_exact_jaccard(text_b):
    hasher = MinHasher()
    exact = exact_jaccard(hasher, LONG_DOCUMENT, text_b)
    estimate = estimated_jaccard(hasher.signature(LONG_DOCUMENT), hasher.signature(text_b))
    # 800 hash functions: standard error sqrt(J(1-J)/800) <= 0.018; 0.06 is over three of them
    assert abs(estimate - exact) < 0.06


def test_minhash_exact_jaccard_on_a_hand_counted_pair():
    # 3-gram shingles: あいうえ -> {あいう, いうえ}; いうえお -> {いうえ, うえお}: 1 shared of 3
    assert exact_jaccard(MinHasher(ngram=3), "あいうえ", "いうえお") == pytest.approx(1 / 3)


def test_minhash_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b = MinHasher(seed=3).signature(LIBRARY), MinHasher(seed=3).signature(LIBRARY)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, MinHasher(seed=4).signature(LIBRARY))
    assert a.shape == (800,) and a.dtype == np.uint32


def test_lsh_removes_the_near_duplicate_and_keeps_distinct_documents():
    hasher = MinHasher()
    assert exact_jaccard(hasher, LONG_DOCUMENT, ONE_SENTENCE_CHANGED) > 0.95
    index = NearDuplicateIndex(hasher)
    verdicts = [index.find_duplicate(text) for text in
                (LONG_DOCUMENT, GADGETS, ONE_SENTENCE_CHANGED, PERSIMMONS + COMMUTE, LIBRARY, GADGETS)]
    # the edited copy and the exact copy point at the documents they repeat; partial overlaps are kept
    assert verdicts == [None, None, 0, None, None, 1]


# --- the CLI ---------------------------------------------------------------------------------------

def load_tool():
    spec = importlib.util.spec_from_file_location("filter_corpus", REPO / "tools" / "filter_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_filter_corpus_cli_writes_kept_records_and_a_report(tmp_path, capsys):
    records = [
        {"id": "library", "text": LIBRARY.replace("。", "．"), "url": "https://city.example/lib"},
        {"id": "gadgets", "text": GADGETS, "url": "https://shop.example/"},
        {"id": "near_copy", "text": LIBRARY.replace("五分ほど", "六分ほど"), "url": "https://copy.example/"},
        {"id": "short", "text": SENTENCES[0], "url": "https://city.example/short"},
        {"id": "diary", "text": PERSIMMONS + COMMUTE, "url": "https://www.blocked.example/diary"},
        {"id": "other", "text": COMMUTE + PERSIMMONS, "url": "https://diary.example/"},
    ]
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    lines.insert(2, "{not json")
    lines.insert(3, json.dumps({"body": "no text field"}))
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "blocked.txt").write_text("blocked.example\n", encoding="utf-8")
    output = tmp_path / "out" / "kept.jsonl"
    code = load_tool().main([str(corpus), "--output", str(output), "--dedup", "--no-progress",
                             "--blocked-domains", str(tmp_path / "blocked.txt"),
                             "--rejected", str(tmp_path / "rejected.jsonl")])
    assert code == 0, capsys.readouterr().err
    kept = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [record["id"] for record in kept] == ["library", "other"]
    assert kept[0]["text"] == LIBRARY and kept[0]["url"] == "https://city.example/lib"
    report = json.loads(output.with_suffix(".report.json").read_text(encoding="utf-8"))
    assert report["documents_read"] == 6 and report["kept"] == 2
    assert report["rejected_by_quality"] == 3 and report["duplicates_removed"] == 1
    fired = {reason: count for reason, count in report["rejections_by_reason"].items() if count}
    assert fired == {"high_katakana_fraction": 1, "too_few_letters": 1, "too_few_japanese_letters": 1,
                     "blocked_url": 1}
    assert report["bad_records"]["skipped"] == {"bad_json": 1, "missing_field": 1}
    rejected = {r["id"]: r for r in map(json.loads, (tmp_path / "rejected.jsonl").read_text().splitlines())}
    assert rejected["near_copy"]["duplicate_of"] == 1
    assert rejected["short"]["rejection_reasons"] == ["too_few_letters", "too_few_japanese_letters"]


def test_filter_corpus_cli_names_a_bad_setting(tmp_path, capsys):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"text": LIBRARY}, ensure_ascii=False) + "\n", encoding="utf-8")
    arguments = [str(corpus), "--output", str(tmp_path / "o.jsonl"), "--set", "min_letters"]
    code = cli.call(load_tool().main, arguments)
    assert code == 2 and "--set 'min_letters': expected NAME=VALUE" in capsys.readouterr().err
