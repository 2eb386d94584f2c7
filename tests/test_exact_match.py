"""Exact-match evaluation of generated answers: batched cached decoding scores what one-prompt-at-a-time
cache-free decoding produces; the tool reports it (sharded) and names bad files."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from helpers import small_config

from plamo_jax import cli
from plamo_jax.data.tokenizer import ByteTokenizer
from plamo_jax.errors import DataError
from plamo_jax.evaluate.exact_match import cut_at_stop, evaluate_exact_match, read_examples
from plamo_jax.evaluate.generate import generate, generator_for
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import save_params
from plamo_jax.train.run import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["日本の首都は", "Two plus two is", "富士山", "x", "The longest prompt of this small set, by far."]
MAX_NEW = 12


@pytest.fixture(scope="module")
def model():
    config = small_config(init_std=0.4)
    run = build_model(config, jax.devices()[:1])
    return run, state_lib.init_params(config.model, run.setup, seed=6)


def reference_answer(run, params, prompt: str, stops: list[str]) -> str:
    """One prompt, no cache, no batch: the pre-cache sampler, then the text before the stop string."""
    tokenizer = ByteTokenizer()
    ids = np.array([tokenizer.bos_id, *tokenizer.encode(prompt)], np.int32)
    out = generate(run.setup.graphdef, params, ids, max_new_tokens=MAX_NEW, stop_ids=(tokenizer.eos_id,))
    return cut_at_stop(tokenizer.decode(out), stops)


def test_exact_match_scores_the_reference_generations(model, tmp_path):
    run, params = model
    stops = [["\n\n"], ["e"], ["\n\n"], ["\n\n"], ["の", "a"]]
    answers = [reference_answer(run, params, p, s) for p, s in zip(PROMPTS, stops, strict=True)]
    assert len(set(answers)) == len(answers)
    records = [{"prompt": p, "answer": a if i % 2 == 0 else a + "?", "stop": s}
               for i, (p, a, s) in enumerate(zip(PROMPTS, answers, stops, strict=True))]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    generator = generator_for(run, params)
    assert generator.cached
    result = evaluate_exact_match(generator, ByteTokenizer(), str(path), add_bos=True, max_new_tokens=MAX_NEW,
                                  batch_size=2)
    assert result["generations"] == answers
    assert result["exact_match"] == 3 / 5 and result["examples"] == 5


def test_bad_generation_files_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2: no string 'answer'"):
        read_examples(str(path))
    with pytest.raises(DataError, match="does not exist"):
        read_examples(str(tmp_path / "missing.jsonl"))
    assert len(read_examples("builtin_generation")) == 200


def test_the_evaluate_tool_reports_exact_match_on_a_sharded_model(model, tmp_path, capsys):
    run, params = model
    checkpoint = tmp_path / "ckpt"
    save_params(checkpoint, jax.device_get(params), run.config.to_json())
    spec = importlib.util.spec_from_file_location("evaluate_tool", os.path.join(ROOT, "tools", "evaluate.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prompts = tmp_path / "qa.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": "-"}) + "\n" for p in PROMPTS))
    arguments = ["--checkpoint", str(checkpoint), "--generation", str(prompts),
                 "--max-new-tokens", str(MAX_NEW), "--mesh", "tensor=2", "--batch-size", "4"]
    assert cli.call(tool.main, arguments) == 0
    [report] = json.loads(capsys.readouterr().out)["generation"]
    assert report["examples"] == len(PROMPTS) and report["exact_match"] == 0.0
    expected = [reference_answer(run, params, p, ["\n\n"]) for p in PROMPTS[:3]]
    assert report["first_generations"] == expected  # data=4 x tensor=2 devices decode what one device does
    assert cli.call(tool.main, [*arguments[:3], str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
