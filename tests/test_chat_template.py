"""data.chat_template="tokenizer": a Hugging Face tokenizer's Jinja template gives the ids and the
assistant mask that transformers' apply_chat_template gives, and agrees with the built-in chatml."""

import json

import numpy as np
import pytest

from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.data.tokenizer import load_tokenizer
from plamo_jax.errors import DataError
from plamo_jax.posttrain.sft import CHAT_TEMPLATES, chat_template, render_conversation

# ChatML with transformers' {% generation %} markers around what the assistant writes.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "あなたは簡潔なアシスタントです。"},
    {"role": "user", "content": "富士山の高さは?"},
    {"role": "assistant", "content": "3,776 mです。"},
    {"role": "user", "content": "And in feet?"},
    {"role": "assistant", "content": "About 12,388 feet."},
]


def make_tokenizer_dir(directory, chat_template_source):
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(read_builtin_documents(), trainer=trainer)
    model.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": chat_template_source}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("chatml"), CHATML)


def test_ids_and_assistant_mask_equal_transformers_apply_chat_template(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"), chat_template=CHATML
    )
    expected = reference.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ids, mask = render_conversation(CONVERSATION, tokenizer, chat_template("tokenizer", tokenizer), True)
    assert ids.tolist() == list(expected["input_ids"])
    assert mask.tolist() == list(expected["assistant_masks"])
    assert tokenizer.decode(ids[mask == 1]) == "3,776 mです。\nAbout 12,388 feet.\n"


def test_tokenizer_template_agrees_with_the_built_in_chatml(tokenizer_dir):
    """Same tokens and mask as the named template (which frames with BOS/EOS itself)."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ids, mask = render_conversation(CONVERSATION, tokenizer, chat_template("tokenizer", tokenizer), True)
    named_ids, named_mask = render_conversation(CONVERSATION, tokenizer, CHAT_TEMPLATES["chatml"], False)
    np.testing.assert_array_equal(ids, named_ids[:-1])  # the named template appends EOS
    np.testing.assert_array_equal(mask, named_mask[:-1])
    # A DPO prompt: earlier assistant turns are context, only the last reply is learned.
    _, last_only = render_conversation(CONVERSATION, tokenizer, chat_template("tokenizer", tokenizer), True,
                                       first_learned=4)
    assert tokenizer.decode(ids[last_only == 1]) == "About 12,388 feet.\n"


def test_unusable_templates_are_named_errors(tmp_path):
    tokenizer = load_tokenizer(str(make_tokenizer_dir(tmp_path, "{{ messages | length }} turns")))
    with pytest.raises(DataError, match="does not render conversations incrementally"):
        render_conversation(CONVERSATION, tokenizer, chat_template("tokenizer", tokenizer), True)
    with pytest.raises(DataError, match="needs a Hugging Face tokenizer whose tokenizer_config.json"):
        chat_template("tokenizer", load_tokenizer("byte"))
    broken = tmp_path / "broken"
    broken.mkdir()
    tokenizer = load_tokenizer(str(make_tokenizer_dir(broken, "{% for m in messages %}")))
    with pytest.raises(DataError, match="does not parse"):
        chat_template("tokenizer", tokenizer)
