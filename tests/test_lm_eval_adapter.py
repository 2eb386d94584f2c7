"""The lm-evaluation-harness adapter: on local JSONL tasks (multiple choice, rolling log-likelihood,
generate_until) it equals lm-eval's own `hf` model run on the exported checkpoint of the same model, with
our forward pass sharded over 8 simulated devices; the tool registers the model for lm-eval's CLI."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import textwrap

import jax
import numpy as np
import pytest
from helpers import small_config

from plamo_jax import cli
from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.evaluate.multiple_choice import builtin_choice_examples
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import save_params
from plamo_jax.train.run import build_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from lm_eval.tasks import TaskManager  # noqa: E402

from plamo_jax.convert import hf  # noqa: E402
from plamo_jax.evaluate import lm_eval_adapter  # noqa: E402  (registers the plamo_jax model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 64
EXAMPLES = 24


def make_tokenizer(directory):
    """A byte-level BPE whose post-processor puts BOS in front, as Llama-style tokenizers do."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None, byte_fallback=False))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(read_builtin_documents(), trainer=trainer)
    model.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A",
                                                                    special_tokens=[("<s>", 1)])
    model.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": MAX_LENGTH}))
    return directory


def write_tasks(directory):
    examples = builtin_choice_examples(EXAMPLES, seed=3)
    (directory / "mc.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    texts = read_builtin_documents()[:10]  # some longer than MAX_LENGTH tokens: several rolling windows
    (directory / "ppl.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                 for t in texts))
    prompts = [{"prompt": e["context"], "answer": e["choices"][e["answer"]]} for e in examples[:8]]
    (directory / "gen.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
    common = "dataset_path: json\ntest_split: test\n"
    tasks = {
        "plamo_mc": """
            output_type: multiple_choice
            doc_to_text: "{{context}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{answer}}"
            metric_list: [{metric: acc}, {metric: acc_norm}]""",
        "plamo_ppl": """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]""",
        "plamo_gen": """
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs: {until: ["。", "\\n"], max_gen_toks: 10, do_sample: false}
            metric_list: [{metric: exact_match}]""",
    }
    for name, body in tasks.items():
        data = str(directory / f"{name.removeprefix('plamo_')}.jsonl")
        header = f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\n"
        (directory / f"{name}.yaml").write_text(header + textwrap.dedent(body))
    return directory


@pytest.fixture(scope="module")
def checkpoint_and_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    config = small_config(vocab_size=512, init_std=0.2)
    config.data.tokenizer = str(make_tokenizer(root))
    config.train.seq_len = MAX_LENGTH
    run = build_model(config, jax.devices()[:1])
    params = jax.device_get(state_lib.init_params(config.model, run.setup, seed=5))
    save_params(root / "ckpt", params, config.to_json())
    hf.checkpoint_to_hf(root / "ckpt", root / "hf", dtype="fp32")
    (root / "tasks").mkdir()
    return root / "ckpt", root / "hf", write_tasks(root / "tasks")


def evaluate(model, model_args, task_manager, tasks):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=8,
                                   task_manager=task_manager, log_samples=True)


@pytest.fixture(scope="module")
def both_results(checkpoint_and_export):
    checkpoint, exported, tasks_dir = checkpoint_and_export
    tasks = ["plamo_mc", "plamo_ppl", "plamo_gen"]
    # only our tasks: indexing lm-eval's thousands of bundled task files takes half a minute
    task_manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    reference = evaluate("hf", {"pretrained": str(exported), "dtype": "float32", "device": "cpu",
                                "max_length": MAX_LENGTH}, task_manager, tasks)
    ours = evaluate("plamo_jax", {"checkpoint": str(checkpoint), "tensor": 2}, task_manager, tasks)
    return ours, reference


def by_doc(results, task):
    return {sample["doc_id"]: sample for sample in results["samples"][task]}


def test_the_adapter_ran_sharded_on_every_device(both_results):
    ours, _ = both_results
    assert ours["config"]["model"] == lm_eval_adapter.MODEL_NAME
    assert ours["config"]["devices"] == 8 and ours["config"]["family"] == "dense"


def test_multiple_choice_log_likelihoods_and_accuracy_equal_the_hf_model(both_results):
    ours, reference = both_results
    mine, theirs = by_doc(ours, "plamo_mc"), by_doc(reference, "plamo_mc")
    assert len(mine) == len(theirs) == EXAMPLES
    ours_ll = np.array([[r[0] for r in mine[d]["filtered_resps"]] for d in sorted(mine)], np.float64)
    theirs_ll = np.array([[r[0] for r in theirs[d]["filtered_resps"]] for d in sorted(theirs)], np.float64)
    np.testing.assert_allclose(ours_ll, theirs_ll, atol=1e-4, rtol=0)
    assert [[r[1] for r in mine[d]["filtered_resps"]] for d in sorted(mine)] == \
        [[r[1] for r in theirs[d]["filtered_resps"]] for d in sorted(theirs)]  # is_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["plamo_mc"][metric] == reference["results"]["plamo_mc"][metric]
    assert np.ptp(ours_ll, axis=1).mean() > 0.5  # the choices really differ: a decisive comparison


def test_rolling_log_likelihoods_equal_the_hf_model(both_results):
    ours, reference = both_results
    mine, theirs = by_doc(ours, "plamo_ppl"), by_doc(reference, "plamo_ppl")
    ours_ll = np.array([mine[d]["filtered_resps"][0] for d in sorted(mine)], np.float64)
    theirs_ll = np.array([theirs[d]["filtered_resps"][0] for d in sorted(theirs)], np.float64)
    assert ours_ll.min() < -300  # long documents: several windows of MAX_LENGTH tokens each
    np.testing.assert_allclose(ours_ll, theirs_ll, atol=1e-4 * 20, rtol=1e-6)  # 1e-4 per window and more
    np.testing.assert_allclose(ours["results"]["plamo_ppl"]["word_perplexity,none"],
                               reference["results"]["plamo_ppl"]["word_perplexity,none"], rtol=1e-5)


def test_generate_until_equals_the_hf_model(both_results):
    ours, reference = both_results
    mine, theirs = by_doc(ours, "plamo_gen"), by_doc(reference, "plamo_gen")
    generated = [mine[d]["filtered_resps"][0] for d in sorted(mine)]
    assert generated == [theirs[d]["filtered_resps"][0] for d in sorted(theirs)]
    assert sum(len(text) for text in generated) > 0


def test_the_tool_runs_lm_evals_command_line_with_the_model_registered(checkpoint_and_export, tmp_path,
                                                                       capsys, monkeypatch):
    """tools/lm_eval_harness.py is lm-eval's own CLI with our model registered (run in-process: no second
    start of JAX, torch and lm-eval); bad model_args are one line and exit status 2."""
    # lm-eval's CLI indexes its thousands of bundled task files (half a minute); this test needs none
    monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__,
                                                                         include_defaults=False))
    assert lm_eval.api.registry.get_model(lm_eval_adapter.MODEL_NAME) is lm_eval_adapter.PlamoJaxLM
    checkpoint, _, tasks_dir = checkpoint_and_export
    spec = importlib.util.spec_from_file_location("lm_eval_harness_tool", os.path.join(ROOT, "tools",
                                                                                        "lm_eval_harness.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    arguments = ["--model", "plamo_jax", "--model_args", f"checkpoint={checkpoint},tensor=2", "--tasks",
                 "plamo_mc", "--include_path", str(tasks_dir), "--limit", "4", "--output_path", str(tmp_path)]
    assert cli.call(tool.main, arguments) == 0
    [written] = tmp_path.rglob("results_*.json")
    assert json.loads(written.read_text())["results"]["plamo_mc"]["acc,none"] >= 0
    capsys.readouterr()
    arguments[3] = f"checkpoint={checkpoint},colour=blue"
    assert cli.call(tool.main, arguments) == 2
    assert "model_args ['colour']: not understood" in capsys.readouterr().err.strip().splitlines()[-1]
