"""Supervised fine-tuning data: chat records rendered with a template into tokens plus a target mask.

A chat corpus is JSONL, one conversation per line: {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...]}. Only what the assistant says is learned: its content,
the template's end-of-turn text and, after a final assistant turn, EOS (so the model learns to
stop). The rendered documents go through the ordinary pipeline (packing `fit` keeps each
conversation whole in one row), so SFT trains with the same launcher, sharding and checkpoints.

Each piece (role header, content, end of turn) is encoded on its own, so a template's special
tokens stay whole and the mask boundaries are exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from plamo_jax.data.documents import TokenDocuments, documents_from_token_lists
from plamo_jax.data.formats import CorpusFormat, CorpusRead
from plamo_jax.data.sources import JSONL_SUFFIXES, ReadReport, iter_json_records, list_input_files
from plamo_jax.data.tokenizer import Tokenizer, encode_to_array
from plamo_jax.errors import DataError
from plamo_jax.posttrain.jinja_template import JinjaChatTemplate, render_with_template

ROLES = ("system", "user", "assistant")
BUILTIN_CHAT = "builtin_chat"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    role_header: str  # "{role}" is replaced by the message's role
    end_of_turn: str


CHAT_TEMPLATES = {
    "chatml": ChatTemplate("<|im_start|>{role}\n", "<|im_end|>\n"),
    "llama3": ChatTemplate("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    # For tokenizers without chat special tokens (the byte tokenizer, base models).
    "plain": ChatTemplate("### {role}:\n", "\n\n"),
}  # and "tokenizer": the chat_template of a Hugging Face tokenizer_config.json (jinja_template.py)


TEMPLATE_NAMES = (*sorted(CHAT_TEMPLATES), "tokenizer")


def chat_template(name: str, tokenizer: Tokenizer | None = None) -> ChatTemplate | JinjaChatTemplate:
    """A named template, or with "tokenizer" the Jinja template of a Hugging Face tokenizer's config."""
    if name not in TEMPLATE_NAMES:
        raise DataError(f"data.chat_template={name!r}; expected one of {TEMPLATE_NAMES}")
    if name != "tokenizer":
        return CHAT_TEMPLATES[name]
    if tokenizer is None:  # validation only: the tokenizer is checked when the data is read
        return CHAT_TEMPLATES["chatml"]
    source = getattr(tokenizer, "chat_template_source", None)
    if not source:
        raise DataError(
            "data.chat_template='tokenizer' needs a Hugging Face tokenizer whose tokenizer_config.json has a "
            f"chat_template; data.tokenizer has none ({type(tokenizer).__name__})"
        )
    return JinjaChatTemplate(source, **tokenizer.special_tokens, where=str(tokenizer.path))


def render_conversation(
    messages: list[dict],
    tokenizer: Tokenizer,
    template: ChatTemplate | JinjaChatTemplate,
    add_bos: bool,
    first_learned: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, target mask): mask[t] = 1 where predicting token t is trained (assistant output).

    Assistant messages before index `first_learned` are context only (a DPO prompt's earlier turns).
    A tokenizer's Jinja template places BOS / end-of-turn tokens itself (add_bos does not apply).
    """
    if isinstance(template, JinjaChatTemplate):
        return render_with_template(messages, tokenizer, template, first_learned)
    pieces: list[np.ndarray] = []
    masks: list[np.ndarray] = []

    def add(ids: np.ndarray, learned: bool) -> None:
        pieces.append(np.asarray(ids, np.int32))
        masks.append(np.full(len(ids), int(learned), np.uint8))

    if add_bos:
        add(np.array([tokenizer.bos_id]), False)
    for index, message in enumerate(messages):
        learned = message["role"] == "assistant" and index >= first_learned
        add(encode_to_array(tokenizer, template.role_header.format(role=message["role"])), False)
        add(encode_to_array(tokenizer, message["content"]), learned)
        add(encode_to_array(tokenizer, template.end_of_turn), learned)
    add(np.array([tokenizer.eos_id]), messages[-1]["role"] == "assistant")
    return np.concatenate(pieces), np.concatenate(masks)


def generation_prompt(
    messages: list[dict], tokenizer: Tokenizer, template: ChatTemplate | JinjaChatTemplate, add_bos: bool
) -> np.ndarray:
    """Tokens of `messages` followed by the opening of an assistant turn: what a model continues."""
    if isinstance(template, JinjaChatTemplate):
        return encode_to_array(tokenizer, template.render(messages, add_generation_prompt=True))
    tokens, _ = render_conversation(messages, tokenizer, template, add_bos)
    opening = encode_to_array(tokenizer, template.role_header.format(role="assistant"))
    return np.concatenate([tokens[:-1], opening]).astype(np.int32)  # without the closing EOS


def check_messages(record: object, messages_field: str) -> str | None:
    """Why a record is not a usable conversation, or None if it is."""
    if not isinstance(record, dict) or messages_field not in record:
        return f"no {messages_field!r} field (data.messages_field)"
    messages = record[messages_field]
    problem = check_message_list(messages, messages_field)
    if problem is not None:
        return problem
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant message with content: nothing to learn"
    return None


def check_message_list(messages: object, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{name!r} is not a non-empty list of messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"{name!r} message {index} has no role in {ROLES}"
        if not isinstance(message.get("content"), str):
            return f"{name!r} message {index} has no string 'content'"
    return None


def read_conversations(
    path: Path, messages_field: str, report: ReadReport, on_bad_input: str
) -> Iterator[list[dict]]:
    for where, record in iter_json_records(path, report, on_bad_input):
        problem = check_messages(record, messages_field)
        if problem is not None:
            report.bad("bad_conversation", where, problem, on_bad_input)
            continue
        report.documents += 1
        report.text_bytes += sum(len(m["content"].encode("utf-8")) for m in record[messages_field])
        yield record[messages_field]


def chat_documents(
    source: str, tokenizer: Tokenizer, data_config, report: ReadReport
) -> TokenDocuments:
    """Render every conversation of a JSONL file or directory (or `builtin_chat`) into documents."""
    template = chat_template(data_config.chat_template, tokenizer)
    if source == BUILTIN_CHAT:
        conversations: Iterator[list[dict]] | list[list[dict]] = builtin_conversations()
        report.documents += len(conversations)
    else:
        files = list_input_files(source, report, data_config.on_bad_input)
        wrong = [str(f) for f in files if f.suffix not in JSONL_SUFFIXES]
        if wrong:
            raise DataError(
                f"data.source entry {source!r}: data.format='chat' reads JSONL conversations; got {wrong[:3]}"
            )
        conversations = (
            conversation
            for file in files
            for conversation in read_conversations(
                file, data_config.messages_field, report, data_config.on_bad_input
            )
        )
    tokens, masks = [], []
    for conversation in conversations:
        ids, mask = render_conversation(conversation, tokenizer, template, bool(data_config.add_bos))
        tokens.append(ids)
        masks.append(mask)
    return documents_from_token_lists(tokens, masks)


def read_chat_corpus(source: str, tokenizer: Tokenizer, data_config) -> CorpusRead:
    report = ReadReport()
    documents = chat_documents(source, tokenizer, data_config, report)
    if documents.num_documents == 0:
        raise DataError(f"data.source entry {source!r} yielded no conversations: {report.summary()}")
    return CorpusRead(documents, report, f"{source} ({report.summary()}, chat)")


def validate_chat_keys(data_config) -> None:
    """The keys that rendering conversations uses (chat SFT and preference pairs)."""
    chat_template(data_config.chat_template)
    if not data_config.messages_field:
        raise DataError("data.messages_field is empty; expected the name of the messages field")


CHAT = CorpusFormat("chat", read_chat_corpus, validate_chat_keys)


_ONES = "零 一 二 三 四 五 六 七 八 九".split()
_ENGLISH = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS_ENGLISH = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _kanji_number(n: int) -> str:
    tens, ones = divmod(n, 10)
    head = "" if tens == 0 else ("十" if tens == 1 else _ONES[tens] + "十")
    return (head + (_ONES[ones] if ones else "")) or _ONES[0]


def _english_number(n: int) -> str:
    if n < 20:
        return _ENGLISH[n]
    tens, ones = divmod(n, 10)
    return _TENS_ENGLISH[tens] + (f"-{_ENGLISH[ones]}" if ones else "")


def builtin_turns(count: int, seed: int) -> list[tuple[str, str, str, bool]]:
    """(question, answer, a worse answer, with a system prompt) in Japanese and English.

    The worse answer is right but ignores the request: a reply in the other language, or digits
    where words were asked for (the kind of preference a Japanese assistant is tuned for).
    """
    rng = np.random.default_rng(seed)
    turns = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(0, 50, size=2))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            turn = (f"{_kanji_number(a)}を英語で。", _english_number(a), f"{_kanji_number(a)}です。")
        elif kind == 1:
            turn = (f"Write {a} in English words.", _english_number(a), str(a))
        elif kind == 2:
            turn = (f"{a}たす{b}は?", f"{a + b}です。", f"{a} plus {b} is {a + b}.")
        else:
            turn = (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a + b}です。")
        turns.append((*turn, bool(rng.random() < 0.3)))
    return turns


def prompt_messages(question: str, with_system: bool) -> list[dict]:
    system = [{"role": "system", "content": "簡潔に。"}] if with_system else []
    return [*system, {"role": "user", "content": question}]


def builtin_conversations(count: int = 3000, seed: int = 0) -> list[list[dict]]:
    """Small bilingual instruction data that needs no download: number words and sums, ja/en."""
    return [
        [*prompt_messages(question, with_system), {"role": "assistant", "content": answer}]
        for question, answer, _, with_system in builtin_turns(count, seed)
    ]
