"""Every entry point answers a bad config value or path with one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "train: a hybrid group of one layer": (
        ["launch/train.py", "--config", "configs/plamo2_tiny.py", "--config.model.mamba_step=1"],
        "model.mamba_step=1"),
    "train: an MoE without experts": (
        ["launch/train.py", "--config", "configs/moe_tiny.py", "--config.model.num_experts=0"],
        "model.num_experts=0"),
    "train: heads that do not split into KV groups": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.model.num_heads=5"],
        "model.num_heads=5"),
    "train: a recipe that does not exist": (["launch/train.py", "--config", "configs/nope.py"], "nope.py"),
    "train: no output directory": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.train.output_dir="], "train.output_dir"),
    "train: a missing init checkpoint": (
        ["launch/train.py", "--config", "configs/tiny.py",
         "--config.checkpoint.init_params=/nonexistent/ckpt"],
        "checkpoint.init_params='/nonexistent/ckpt'"),
    "train: a negative learning rate": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.optimizer.learning_rate=-0.01"],
        "optimizer.learning_rate=-0.01"),
    "train: a negative warmup": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.optimizer.warmup_steps=-5"],
        "optimizer.warmup_steps=-5"),
    "train: logging every 0 steps": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.train.log_every=0"],
        "train.log_every=0"),
    "train: no microbatches": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.train.microbatches=0"],
        "train.microbatches=0"),
    "train: keeping no checkpoint": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.checkpoint.keep_last=0"],
        "checkpoint.keep_last=0"),
    "train: a key path that does not exist": (
        ["launch/train.py", "--config", "configs/moe_tiny.py", "--config.model.moe.num_experts=4"],
        "--config.model.moe.num_experts=4"),
    "train: a ramp that does not reach the batch": (
        ["launch/train.py", "--config", "configs/tiny.py", "--config.train.rampup_batch_start=4",
         "--config.train.rampup_batch_increment=5", "--config.train.rampup_samples=100"],
        "train.rampup_batch_increment=5"),
    "convert to-hf: no checkpoint": (
        ["tools/convert_checkpoint.py", "to-hf", "--checkpoint", "/nonexistent/ckpt", "--out", "{tmp}/hf"],
        "/nonexistent/ckpt"),
    "convert from-hf: no config.json": (
        ["tools/convert_checkpoint.py", "from-hf", "--hf", "{tmp}", "--out", "{tmp}/ckpt"], "config.json"),
    "evaluate: no checkpoint": (
        ["tools/evaluate.py", "--checkpoint", "/nonexistent/ckpt", "--perplexity", "builtin"],
        "/nonexistent"),
    "generate: no checkpoint": (
        ["tools/generate.py", "--checkpoint", "/nonexistent/ckpt", "--prompt", "x"], "/nonexistent"),
    "upcycle: no dense checkpoint": (["tools/upcycle.py", "/nonexistent/ckpt", "{tmp}/moe"], "/nonexistent"),
    "estimate: a hybrid group of one layer": (
        ["tools/estimate_memory.py", "--config", "configs/plamo2_tiny.py", "--devices", "1",
         "--config.model.mamba_step=1"], "model.mamba_step=1"),
    "estimate: a mesh larger than the devices": (
        ["tools/estimate_memory.py", "--config", "configs/tiny.py", "--devices", "2", "--config.mesh.data=4"],
        "mesh"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_exit_status_2(name, tmp_path):
    arguments, named = CASES[name]
    arguments = [arg.replace("{tmp}", str(tmp_path)) for arg in arguments]
    if arguments[0] == "launch/train.py":
        arguments.append(f"--config.train.output_dir={tmp_path / 'run'}")
        if "--config.train.output_dir=" in arguments[:-1]:
            arguments.pop()  # the case is the empty output directory itself
    done = subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert named in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
