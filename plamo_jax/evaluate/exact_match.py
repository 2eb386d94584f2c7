"""Generation accuracy: greedy continuations compared with reference answers (exact match), in batches with
the KV cache (evaluate/generate.py), the way lm-evaluation-harness scores generate_until tasks.

Each example is JSONL {"prompt": str, "answer": str} with optional "stop": [str, ...] (default: a
blank line, "\\n\\n"). The prompt is continued raw ([BOS] + prompt when data.add_bos), each row stops at
EOS, at its first stop string or after `max_new_tokens`; the text before the stop string, stripped of
surrounding whitespace, must equal the stripped answer. `builtin_generation` is the bundled
two-way-choice set with only the right answer (its prompts end where the assistant's reply begins).
"""

from __future__ import annotations

import numpy as np

from plamo_jax.data.tokenizer import Tokenizer, encode_to_array
from plamo_jax.evaluate.generate import Generator
from plamo_jax.evaluate.jsonl_examples import read_jsonl_examples
from plamo_jax.evaluate.multiple_choice import builtin_choice_examples

BUILTIN_GENERATION = "builtin_generation"
DEFAULT_STOP = ("\n\n",)


def check_example(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("prompt"), str) or not record["prompt"]:
        return "no non-empty string 'prompt'"
    if not isinstance(record.get("answer"), str):
        return "no string 'answer'"
    stop = record.get("stop", list(DEFAULT_STOP))
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        return "'stop' is not a list of non-empty strings"
    return None


def read_examples(source: str) -> list[dict]:
    """Examples of a JSONL file (every record must be valid: a benchmark must not shrink silently)."""
    if source == BUILTIN_GENERATION:
        return [{"prompt": e["context"], "answer": e["choices"][e["answer"]]}
                for e in builtin_choice_examples()]
    return read_jsonl_examples(source, "generation", check_example,
                               '{"prompt": str, "answer": str, "stop": [str, ...] (optional)}')


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def evaluate_exact_match(generator: Generator, tokenizer: Tokenizer, source: str, *, add_bos: bool,
                         max_new_tokens: int, batch_size: int) -> dict:
    examples = read_examples(source)
    bos = [tokenizer.bos_id] if add_bos else []
    stops = [list(example.get("stop", DEFAULT_STOP)) for example in examples]
    outputs = []
    for start in range(0, len(examples), batch_size):
        chunk = range(start, min(start + batch_size, len(examples)))
        prompts = [bos + encode_to_array(tokenizer, examples[i]["prompt"]).tolist() for i in chunk]

        def reached_stop(row: int, ids: list[int], chunk=chunk) -> bool:
            text = tokenizer.decode(ids)
            return any(stop in text for stop in stops[chunk[row]])

        outputs.extend(generator.generate(prompts, max_new_tokens=max_new_tokens,
                                          stop_ids=(tokenizer.eos_id,), stop=reached_stop))
    texts = [cut_at_stop(tokenizer.decode(ids[:max_new_tokens]), stop)
             for ids, stop in zip(outputs, stops, strict=True)]
    matches = [text.strip() == example["answer"].strip()
               for text, example in zip(texts, examples, strict=True)]
    return {
        "source": source,
        "examples": len(examples),
        "exact_match": float(np.mean(matches)),
        "generated_tokens_mean": float(np.mean([len(ids) for ids in outputs])),
        "generations": texts,
    }
