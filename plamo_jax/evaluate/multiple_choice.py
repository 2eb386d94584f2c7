"""Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores JCommonsenseQA-style tasks.

Each example is JSONL {"context": str, "choices": [str, ...], "answer": index}. Every choice is
scored by the summed log-probability of its tokens after [BOS] + context (the continuation is the
only masked-in part); `accuracy` takes the best sum, `accuracy_normalized` the best sum per UTF-8
byte of the choice (which removes the bias towards short answers). A context too long for the
sequence keeps its end.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from plamo_jax.data import batch as batch_layout
from plamo_jax.data.packing import row_arrays
from plamo_jax.data.tokenizer import Tokenizer, encode_to_array
from plamo_jax.errors import DataError
from plamo_jax.evaluate.jsonl_examples import read_jsonl_examples
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.posttrain.sft import CHAT_TEMPLATES, builtin_turns
from plamo_jax.train import state as state_lib
from plamo_jax.train.losses import sequence_log_probs
from plamo_jax.train.metrics import Progress
from plamo_jax.train.run import ModelRun
from plamo_jax.train.step import forward

BUILTIN_CHOICE = "builtin_choice"


def check_example(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("context"), str):
        return "no string 'context'"
    choices = record.get("choices")
    well_formed = isinstance(choices, list) and all(isinstance(c, str) and c for c in choices)
    if not well_formed or len(choices) < 2:
        return "'choices' is not a list of two or more non-empty strings"
    answer = record.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"'answer' is not an index into the {len(choices)} choices"
    return None


def read_examples(source: str) -> list[dict]:
    """Examples of a JSONL file (every record must be valid: a benchmark must not shrink silently)."""
    if source == BUILTIN_CHOICE:
        return builtin_choice_examples()
    return read_jsonl_examples(source, "multiple-choice", check_example,
                               '{"context": str, "choices": [str, ...], "answer": int}')


def choice_row(context: np.ndarray, choice: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    keep = max(0, seq_len + 1 - len(choice))
    if len(choice) > seq_len:
        raise DataError(f"a choice of {len(choice)} tokens does not fit train.seq_len={seq_len}")
    context = context[-keep:] if keep else context[:0]
    tokens = np.concatenate([context, choice]).astype(np.int32)
    mask = np.concatenate([np.zeros(len(context), np.uint8), np.ones(len(choice), np.uint8)])
    return row_arrays(tokens, np.zeros(len(tokens), np.int64), seq_len, pad_id, mask)


def evaluate_multiple_choice(
    run: ModelRun,
    params,
    tokenizer: Tokenizer,
    source: str,
    *,
    seq_len: int,
    batch_size: int,
) -> dict:
    config = run.config
    examples = read_examples(source)
    rows, owners = [], []
    for index, example in enumerate(examples):
        context = encode_to_array(tokenizer, example["context"])
        if config.data.add_bos:
            context = np.concatenate([[tokenizer.bos_id], context])
        for choice_index, choice in enumerate(example["choices"]):
            rows.append(choice_row(context, encode_to_array(tokenizer, choice), seq_len, tokenizer.pad_id))
            owners.append((index, choice_index))
    padding = -len(rows) % batch_size
    rows.extend([batch_layout.empty_row(seq_len, tokenizer.pad_id)] * padding)

    def choice_log_probs(params, batch):
        logits, _ = forward(run.setup.graphdef, params, batch)
        return sequence_log_probs(logits, batch["target_ids"], batch["loss_mask"])[0]

    batch_sharding = run.batch_sharding
    score = jax.jit(choice_log_probs, in_shardings=(run.setup.param_shardings, batch_sharding))
    # Every process builds all rows and passes its slice of each batch (the trainer's layout).
    local_rows = batch_size // jax.process_count()
    first_local = jax.process_index() * local_rows
    log_probs = []
    progress = Progress(0, len(rows) // batch_size, enabled=jax.process_index() == 0)
    with sharding_context(run.mesh, run.rules):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start + first_local : start + first_local + local_rows]
            local = {key: np.stack([row[key] for row in chunk]) for key in chunk[0]}
            scores = score(params, state_lib.global_batch(local, batch_sharding, batch_size))
            log_probs.extend(np.asarray(multihost_utils.process_allgather(scores, tiled=True)))
            progress.update(1)
    progress.close()

    sums = [[0.0] * len(example["choices"]) for example in examples]
    for (index, choice_index), value in zip(owners, log_probs, strict=False):
        sums[index][choice_index] = float(value)
    correct = correct_normalized = 0
    for example, choice_sums in zip(examples, sums, strict=True):
        lengths = [len(choice.encode("utf-8")) for choice in example["choices"]]
        correct += int(np.argmax(choice_sums)) == example["answer"]
        correct_normalized += int(np.argmax(np.array(choice_sums) / lengths)) == example["answer"]
    return {
        "source": source,
        "examples": len(examples),
        "accuracy": correct / len(examples),
        "accuracy_normalized": correct_normalized / len(examples),
        "chance": float(np.mean([1 / len(example["choices"]) for example in examples])),
        "choice_log_probs": sums,
    }


def builtin_choice_examples(count: int = 200, seed: int = 7) -> list[dict]:
    """The bundled chat questions as two-way choices: the answer in the asked language and form vs not."""
    rng = np.random.default_rng(seed)
    plain = CHAT_TEMPLATES["plain"]  # the bundled SFT recipe's template
    examples = []
    for question, answer, worse, _ in builtin_turns(count, seed):
        choices = [answer, worse]
        order = rng.permutation(2)
        examples.append({
            "context": plain.role_header.format(role="user") + question + plain.end_of_turn
            + plain.role_header.format(role="assistant"),
            "choices": [choices[i] for i in order],
            "answer": int(np.flatnonzero(order == 0)[0]),
        })
    return examples
