"""Defaults of the `data` config section (every key a recipe or override may set).

Checked once at start by `plamo_jax.data.pipeline.validate_data_config`.
"""

import ml_collections


def data_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # Comma-separated corpora, each `path` or `path:weight` (weights are relative token shares).
    # `builtin` is the bundled Japanese/English corpus (needs no download). A path is either a
    # directory written by tools/tokenize_corpus.py (has manifest.json) or a .jsonl / .parquet /
    # .txt file, or a directory of them, tokenized in memory at start (small corpora only).
    d.source = "builtin"
    # `byte` (pad 0, bos 1, eos 2, bytes 3..258), a SentencePiece .model file, or a Hugging Face
    # tokenizer.json (or a directory holding one).
    d.tokenizer = "byte"
    # Hugging Face tokenizers only: special token strings; "" = read tokenizer_config.json / guess.
    d.bos_token = ""
    d.eos_token = ""
    d.pad_token = ""
    d.text_field = "text"  # JSONL / Parquet column holding the document text
    # text: documents of plain text, every token learned. chat: JSONL conversations for SFT
    # (`builtin_chat` is a bundled set), only assistant output learned (plamo_jax/posttrain/sft.py).
    # preference: JSONL {"prompt", "chosen", "rejected"} pairs for train.objective=dpo
    # (`builtin_preference` is a bundled set; plamo_jax/posttrain/preference_data.py).
    # A `chat:` or `text:` prefix on a data.source entry overrides this for that corpus.
    d.format = "text"
    d.messages_field = "messages"  # chat: the field holding [{"role", "content"}, ...]
    # chat and preference: chatml | llama3 | plain | tokenizer (the Jinja chat_template of a Hugging
    # Face tokenizer's tokenizer_config.json; it places BOS and end-of-turn tokens itself)
    d.chat_template = "chatml"
    d.add_bos = True  # prepend BOS to every document (EOS is always appended)
    d.shuffle = True  # a new seeded document order every epoch
    # Read the packed rows of each epoch in a seeded order (concat and pad packing; fit rows already
    # are): the rows of a batch come from anywhere in the epoch, not from one stretch of the document
    # stream, where a long document fills many rows of the same batch. Still a pure function of
    # (seed, row), so resume and elastic resume are exact, and every token is an input once per epoch.
    # On by default, as Megatron-LM shuffles its samples: batches of correlated rows are what a new run
    # should not get. The cost is random rather than sequential reads of memory-mapped corpora. A run
    # checkpointed before this key existed continues its own data order with shuffle_rows=False.
    d.shuffle_rows = True
    # concat: documents back to back, rows cut every seq_len tokens (no padding).
    # pad: every row starts at a document start; long documents continue in following rows and
    # the rest of a row is padding.
    # fit: whole documents share rows and are never split (SFT); longer ones are cut to seq_len + 1.
    d.packing = "concat"
    d.on_bad_input = "skip"  # skip (count and report) | fail (raise at the first bad record)
    d.mixture_block_rows = 1000  # rows over which mixture weights are met exactly (up to rounding)
    d.num_threads = 2  # Grain reader threads
    d.prefetch_batches = 2  # batches Grain prepares ahead of the trainer
    d.worker_count = 0  # Grain worker processes (0 = read in this process)
    return d
