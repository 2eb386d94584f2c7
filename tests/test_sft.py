"""SFT data: chat rendering and masks, whole-conversation packing, packed loss == per-conversation loss."""

import json
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import make_train_iterator, small_config
from test_train_end_to_end import ROOT, read_metrics, run

from plamo_jax.configuration import load_recipe
from plamo_jax.data.documents import documents_from_token_lists
from plamo_jax.data.packing import PackedRows, fit_documents
from plamo_jax.data.tokenizer import ByteTokenizer
from plamo_jax.errors import DataError
from plamo_jax.models.decoder import Decoder
from plamo_jax.posttrain.sft import CHAT_TEMPLATES, builtin_conversations, render_conversation
from plamo_jax.train.objectives.lm import lm_loss_sums

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_chatml_rendering_and_mask_cover_exactly_the_assistant_output():
    tokenizer = ByteTokenizer()
    tokens, mask = render_conversation(CONVERSATION, tokenizer, CHAT_TEMPLATES["chatml"], add_bos=True)
    expected_text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
    )
    assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
    assert tokenizer.decode(tokens) == expected_text
    learned = tokens[mask == 1]
    assert learned[-1] == tokenizer.eos_id  # the model learns to stop after its last turn
    assert tokenizer.decode(learned) == "4<|im_end|>\n6<|im_end|>\n"
    # A conversation ending on a user turn has nothing learned after it.
    _, mask_user_last = render_conversation(CONVERSATION[:4], tokenizer, CHAT_TEMPLATES["chatml"], True)
    assert mask_user_last[-1] == 0


@pytest.mark.parametrize("capacity", [7, 16, 33])
def test_fit_packing_keeps_every_document_whole_and_visits_each_once_per_epoch(capacity):
    rng = np.random.default_rng(capacity)
    lengths = rng.integers(2, capacity + 1, size=60)
    documents = [rng.integers(3, 200, size=n).astype(np.int32) for n in lengths]
    rows = fit_documents(np.array(lengths), capacity)
    assert sorted(np.concatenate(rows).tolist()) == list(range(60))
    assert all(lengths[row].sum() <= capacity for row in rows)
    packed = PackedRows(
        documents_from_token_lists(documents), seq_len=capacity - 1, seed=3, packing="fit", pad_id=0
    )
    assert packed.rows_per_epoch == len(rows)
    for epoch in range(2):
        seen = []
        for index in range(epoch * len(rows), (epoch + 1) * len(rows)):
            row = packed[index]
            real = np.flatnonzero(row["segment_ids"])
            for segment in np.unique(row["segment_ids"][real]):
                at = np.flatnonzero(row["segment_ids"] == segment)
                # A document's last token is an input unless the document ends the row (then a target).
                last = segment == row["segment_ids"].max()
                piece = row["input_ids"][at]
                if last:
                    piece = np.concatenate([piece, row["target_ids"][at[-1:]]])
                matches = [i for i, d in enumerate(documents) if len(d) == len(piece) and (d == piece).all()]
                assert matches, "a packed segment is not a whole document"
                seen.append(matches[0])
        assert sorted(seen) == list(range(60))


def test_fit_packing_cuts_only_documents_longer_than_a_row():
    documents = [np.arange(3, 3 + n, dtype=np.int32) for n in (5, 40, 9)]
    packed = PackedRows(documents_from_token_lists(documents), seq_len=15, seed=0, packing="fit")
    assert packed.truncated_documents == 1
    assert packed.rows_per_epoch == 2  # the cut document alone, then 5 + 9 tokens together


@pytest.mark.parametrize("packing", ["fit", "pad", "concat"])
def test_loss_mask_counts_exactly_the_learned_targets(packing):
    """Over one epoch every learned target appears in the loss exactly once (concat: up to a row)."""
    tokenizer = ByteTokenizer()
    conversations = builtin_conversations(count=40, seed=1)
    rendered = [render_conversation(c, tokenizer, CHAT_TEMPLATES["plain"], True) for c in conversations]
    documents = documents_from_token_lists([t for t, _ in rendered], [m for _, m in rendered])
    packed = PackedRows(documents, seq_len=128, seed=0, packing=packing, shuffle=False)
    learned = Counter()
    for tokens, mask in rendered:
        learned.update(tokens[mask == 1].tolist())
    counted = Counter()
    for index in range(math.ceil(packed.rows_per_epoch)):
        row = packed[index]
        counted.update(row["target_ids"][row["loss_mask"] > 0].tolist())
    if packing == "concat":  # the last row runs into the next epoch by up to one row
        assert counted - learned == Counter() or sum((counted - learned).values()) <= 128
        assert sum((learned - counted).values()) == 0
    else:
        assert counted == learned


def test_packed_sft_loss_equals_each_conversation_alone():
    """Packed rows (fit) give the same summed loss and token count as conversations run one by one."""
    config = load_recipe("sft_tiny")
    config.data.source = "builtin_chat"
    model_cfg = small_config(vocab_size=512).model
    data = make_train_iterator(config.data, seq_len=128, global_batch_size=4, seed=0)
    batch = next(data)
    model = Decoder(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    _, packed = lm_loss_sums(graphdef, params, jax.tree.map(jnp.asarray, batch), model_cfg, z_loss=0.0)

    tokenizer = data.tokenizer
    cross_entropy, tokens = 0.0, 0.0
    for row in range(4):
        segments = batch["segment_ids"][row]
        for segment in np.unique(segments[segments > 0]):
            at = np.flatnonzero(segments == segment)
            document = batch["input_ids"][row, at]
            if segment == segments.max():  # the row's last document ends with a target, not an input
                document = np.concatenate([document, batch["target_ids"][row, at[-1:]]])
            conversation = _find_conversation(document, tokenizer)
            ids, mask = render_conversation(conversation, tokenizer, CHAT_TEMPLATES["plain"], True)
            length = len(ids) - 1
            logits, _ = model(ids[None, :-1], np.ones((1, length), np.int32), np.arange(length)[None])
            log_probs = jax.nn.log_softmax(logits[0].astype(jnp.float32))
            nll = -np.take_along_axis(np.asarray(log_probs), ids[1:, None], axis=-1)[:, 0]
            cross_entropy += float((nll * mask[1:]).sum())
            tokens += float(mask[1:].sum())
    assert float(packed["tokens"]) == tokens
    np.testing.assert_allclose(float(packed["cross_entropy"]), cross_entropy, rtol=1e-5)


def _find_conversation(document: np.ndarray, tokenizer) -> list[dict]:
    for conversation in builtin_conversations():
        ids, _ = render_conversation(conversation, tokenizer, CHAT_TEMPLATES["plain"], True)
        if len(ids) == len(document) and (ids == document).all():
            return conversation
    raise AssertionError("packed segment matches no conversation")


def test_bad_chat_records_name_the_file_line_and_problem(tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"conversation": []},
        {"messages": [{"role": "robot", "content": "x"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = load_recipe("sft_tiny")
    config.data.source = str(path)
    config.data.on_bad_input = "fail"
    with pytest.raises(DataError, match=r"chat.jsonl:2: bad_conversation: no assistant message"):
        make_train_iterator(config.data, seq_len=64, global_batch_size=2, seed=0)
    config.data.on_bad_input = "skip"
    data = make_train_iterator(config.data, seq_len=64, global_batch_size=2, seed=0)
    report = data.read_report
    assert report.documents == 1 and report.skipped == {"bad_conversation": 3}
    assert any("chat.jsonl:4" in e and "role" in e for e in report.examples)
    config.data.chat_template = "vicuna"
    with pytest.raises(DataError, match=r"data.chat_template='vicuna'; expected one of"):
        make_train_iterator(config.data, seq_len=64, global_batch_size=2, seed=0)


def test_chat_and_text_corpora_mix_in_one_run():
    """`chat:` / `text:` prefixes: conversations learn only assistant tokens, text rows learn every token."""
    config = load_recipe("sft_tiny")
    config.data.format = "text"
    config.data.source = "chat:builtin_chat:1,text:builtin:1"
    data = make_train_iterator(config.data, seq_len=128, global_batch_size=16, seed=0)
    assert [c.spec.format for c in data.corpora] == ["chat", "text"]
    batch = next(data)
    owner = [data.rows.schedule.assign(row)[0] for row in range(16)]
    assert set(owner) == {0, 1}
    for row, corpus in enumerate(owner):
        real = batch["segment_ids"][row] > 0
        fraction = batch["loss_mask"][row][real].mean()
        if corpus == 0:
            assert fraction < 0.5  # headers, prompts and BOS are context only
        else:
            # every target except where a new document starts (its first token has no context)
            starts = int((np.diff(batch["segment_ids"][row][real]) != 0).sum())
            assert batch["loss_mask"][row][real].sum() == real.sum() - starts


@pytest.mark.slow  # minutes of training; the default suite keeps the faster checks of the same code
def test_sft_recipe_learns_the_assistant_answers(tmp_path):
    """configs/sft_tiny.py through the ordinary launcher (from scratch here): the loss on assistant tokens
    ends far below their unigram entropy."""
    steps = 150
    run(["--config", "configs/sft_tiny.py", f"--config.train.output_dir={tmp_path}",
         f"--config.train.steps={steps}", "--config.checkpoint.init_params=",
         "--config.checkpoint.enabled=False", "--config.optimizer.learning_rate=3e-3"])
    metrics = read_metrics(tmp_path)
    config = load_recipe(ROOT / "configs/sft_tiny.py")
    data = make_train_iterator(config.data, seq_len=config.train.seq_len,
                               global_batch_size=config.train.global_batch_size, seed=config.train.seed)
    counts = Counter()
    for _ in range(steps):
        batch = next(data)
        counts.update(batch["target_ids"][batch["loss_mask"] > 0].tolist())
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    final = np.mean([m["cross_entropy"] for m in metrics[-10:]])
    assert final < 0.3 * entropy, (final, entropy)
    assert metrics[-1]["data/loss_token_fraction"] < 0.3  # prompts and headers are not learned
