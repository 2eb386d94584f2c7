"""Bad input that used to end in a traceback, a silent overwrite or a wrong result: one line, status 2,
nothing lost. Each case is one a user ran into; the cheap config cases are in test_cli_errors.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import small_config

from plamo_jax.configuration import default_config
from plamo_jax.convert import hf
from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.train.checkpoint import Checkpointer, load_config, load_params
from plamo_jax.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def one_line_error(arguments: list[str], named: str, status: int = 2) -> str:
    done = subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and named in lines[-1], done.stderr[-3000:]
    return lines[-1]


def tiny_run_config(output_dir, steps: int = 4):
    config = small_config(vocab_size=512)
    config.train.update(steps=steps, global_batch_size=8, seq_len=32, output_dir=str(output_dir), log_every=2)
    config.checkpoint.update(enabled=True, every_steps=2, async_save=False)
    config.mesh.update(data=-1)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("trained")
    train(tiny_run_config(output_dir))
    return output_dir


def copy_of(trained, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def launch(output_dir: Path, *overrides: str) -> list[str]:
    config = tiny_run_config(output_dir)
    keys = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "qk_norm")
    flags = [f"--config.model.{key}={config.model[key]}" for key in keys]
    return ["launch/train.py", "--config", "configs/tiny.py", f"--config.train.output_dir={output_dir}",
            "--config.train.global_batch_size=8", "--config.train.seq_len=32", *flags, *overrides]


def test_fewer_steps_than_the_checkpoint_on_disk_is_refused(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    one_line_error(launch(run, "--config.train.steps=2"), "train.steps=2")


def test_a_changed_model_shape_is_named(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    line = one_line_error(launch(run, "--config.train.steps=6", "--config.model.mlp_dim=256"),
                          "model.mlp_dim=256")
    assert "(checkpoint: 128)" in line


def test_every_checkpoint_unreadable_is_one_line_and_nothing_is_deleted(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    for step in ("2", "4"):
        shutil.rmtree(run / "checkpoints" / step / "state")
    one_line_error(launch(run, "--config.train.steps=6"), "no checkpoint is readable")
    assert (run / "checkpoints" / "2").is_dir() and (run / "checkpoints" / "4").is_dir()


def test_a_foreign_data_state_in_the_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    metadata = run / "checkpoints" / "4" / "data" / "metadata"
    state = json.loads(metadata.read_text())
    metadata.write_text(json.dumps(dict(state, fingerprint="0123456789abcdef")))  # another corpus's state
    config = tiny_run_config(run, steps=6)
    result = train(config)
    assert result.final_step == 6
    assert (run / "checkpoints_unreadable").is_dir()  # the foreign step was moved aside, not deleted
    restarted = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert restarted == sorted(set(restarted)) and restarted[-1] == 6


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("a user's file\n")
    one_line_error(launch(tmp_path / "taken" / "run", "--config.train.steps=2"), "is a file")
    assert (tmp_path / "taken").read_text() == "a user's file\n"


def test_an_unusable_checkpoint_directory_is_one_line():
    one_line_error(launch(Path("/proc/plamo_jax_run"), "--config.train.steps=2"), "/proc/plamo_jax_run")


def test_to_hf_never_overwrites_files_in_the_output_directory(trained, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    one_line_error(["tools/convert_checkpoint.py", "to-hf", "--checkpoint", str(trained / "checkpoints"),
                    "--out", str(out), "--dtype", "fp32"], "is not an empty directory")
    assert (out / "config.json").read_text() == '{"mine": true}\n'
    one_line_error(["tools/convert_checkpoint.py", "to-hf", "--checkpoint", str(trained / "checkpoints"),
                    "--out", str(tmp_path / "new"), "--tokenizer", "/nonexistent/tok"], "/nonexistent/tok")


def test_a_checkpoint_without_its_metadata_is_one_line_in_to_hf_and_evaluate(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    (run / "checkpoints" / "4" / "state" / "_METADATA").unlink()
    checkpoint = str(run / "checkpoints")
    one_line_error(["tools/convert_checkpoint.py", "to-hf", "--checkpoint", checkpoint, "--out",
                    str(tmp_path / "hf")], "metadata")
    one_line_error(["tools/evaluate.py", "--checkpoint", checkpoint, "--perplexity", "builtin"], "metadata")


def test_upcycle_checks_ratio_and_destination_before_reading(trained, tmp_path):
    checkpoint = str(trained / "checkpoints")
    one_line_error(["tools/upcycle.py", "--ratio", "1.5", checkpoint, str(tmp_path / "moe")], "--ratio 1.5")
    one_line_error(["tools/upcycle.py", checkpoint, checkpoint], "already holds a checkpoint")


@pytest.mark.parametrize("arguments, named", [
    (["tools/generate.py", "--checkpoint", "x", "--prompt", "a", "--top-p", "0"], "--top-p=0.0"),
    (["tools/generate.py", "--checkpoint", "x", "--prompt", "a", "--temperature", "-1"],
     "--temperature=-1.0"),
    (["tools/evaluate.py", "--checkpoint", "x", "--perplexity", "builtin", "--seq-len", "0"], "--seq-len=0"),
], ids=["top-p 0", "temperature -1", "seq-len 0"])
def test_tool_arguments_that_cannot_work_are_refused(arguments, named):
    one_line_error(arguments, named)


# -- a model imported from Hugging Face keeps its metadata through training and export -----------------

@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None, byte_fallback=False))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(read_builtin_documents(), trainer=trainer)
    model.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 4096}))
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, max_position_embeddings=4096, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_an_imported_model_keeps_its_metadata_through_training_and_export(llama_with_tokenizer, tmp_path):
    hf.hf_to_checkpoint(llama_with_tokenizer, tmp_path / "start", default_config())
    config = load_config(tmp_path / "start")
    config.data.tokenizer = str(llama_with_tokenizer)
    config.train.update(steps=2, global_batch_size=8, seq_len=32, output_dir=str(tmp_path / "run"))
    config.checkpoint.update(init_params=str(tmp_path / "start"), async_save=False)
    train(config)
    out = tmp_path / "exported"
    hf.checkpoint_to_hf(tmp_path / "run" / "checkpoints", out, dtype="fp32")
    exported = json.loads((out / "config.json").read_text())
    assert exported["max_position_embeddings"] == 4096  # not the training seq_len of 32
    assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (1, 2, 0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation.get("eos_token_id") == 2 and generation.get("bos_token_id") == 1
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    # Without the imported assets, the ids still come from the tokenizer the run trained with.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "hf_assets")
    hf.checkpoint_to_hf(tmp_path / "run" / "checkpoints", tmp_path / "bare", dtype="fp32")
    bare = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert (bare["bos_token_id"], bare["eos_token_id"], bare["pad_token_id"]) == (1, 2, 0)
    params, _ = load_params(tmp_path / "run" / "checkpoints")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert Checkpointer(tmp_path / "run" / "checkpoints", every_steps=1).all_steps() == [2]


def test_a_missing_safetensors_shard_is_named(trained, tmp_path):
    hf.checkpoint_to_hf(trained / "checkpoints", tmp_path / "hf", dtype="fp32", max_shard_bytes=2**16)
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    one_line_error(["tools/convert_checkpoint.py", "from-hf", "--hf", str(tmp_path / "hf"), "--out",
                    str(tmp_path / "ckpt")], shards[1].name)
    assert not (tmp_path / "ckpt").exists()


def test_a_truncated_token_shard_is_named(tmp_path):
    command = [sys.executable, "tools/tokenize_corpus.py", "builtin", "--output", str(tmp_path / "tokens"),
               "--no_progress"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shard = next((tmp_path / "tokens").glob("*.tokens.npy"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    one_line_error(launch(tmp_path / "run", f"--config.data.source={tmp_path / 'tokens'}"), shard.name)
