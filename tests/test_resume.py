"""Resuming launch/train.py after SIGKILL or SIGTERM reproduces an uninterrupted run's losses bitwise."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 20, 4


def train_command(output_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
        f"--config.train.steps={STEPS}", f"--config.train.output_dir={output_dir}",
        f"--config.checkpoint.every_steps={EVERY}", "--config.train.log_every=1",
        "--config.train.global_batch_size=4", "--config.train.seq_len=64", "--config.model.dtype=float32",
        *extra,
    ]


def environment() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device: the run under test, not the test process's simulated mesh
    return env


def run_to_end(output_dir: Path, extra: tuple[str, ...] = ()) -> None:
    done = subprocess.run(train_command(output_dir, extra), env=environment(), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(output_dir: Path, name: str = "metrics.jsonl") -> list[tuple[int, float]]:
    """Every (step, loss) line of metrics.jsonl (or of metrics.superseded.jsonl: the lines of steps that
    a killed attempt ran after its last checkpoint and the rerun ran again)."""
    path = output_dir / name
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        if "loss" in record:
            records.append((record["step"], record["loss"]))
    return records


def committed_steps(output_dir: Path) -> list[int]:
    root = output_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def start_and_wait(output_dir: Path, until, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    process = subprocess.Popen(train_command(output_dir, extra), env=environment(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not until():
        if process.poll() is not None:
            stderr = process.stderr.read()[-3000:]
            raise AssertionError(f"training ended early (rc {process.returncode}): {stderr}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training made no progress in 300 s")
        time.sleep(0.2)
    return process


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(output_dir)
    by_step = dict(losses(output_dir))
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return by_step


def assert_matches_reference(output_dir: Path, reference: dict[int, float]) -> None:
    records = losses(output_dir)
    assert {step for step, _ in records} == set(reference)
    for step, loss in records:  # bitwise: the JSON floats are the fp32 losses' exact values
        assert loss == reference[step], f"step {step}: {loss!r} != {reference[step]!r}"


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, reference):
    process = start_and_wait(tmp_path, lambda: EVERY in committed_steps(tmp_path)
                             and max((s for s, _ in losses(tmp_path)), default=0) >= EVERY + 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(s for s, _ in losses(tmp_path))
    assert killed_at < STEPS
    run_to_end(tmp_path)
    assert_matches_reference(tmp_path, reference)
    # Steps after the restored checkpoint were computed twice (before the kill and after): metrics.jsonl
    # holds each once, the killed attempt's lines moved aside, with the same values.
    steps = [s for s, _ in losses(tmp_path)]
    assert len(steps) == len(set(steps))
    superseded = losses(tmp_path, "metrics.superseded.jsonl")
    assert superseded and min(s for s, _ in superseded) > EVERY - 1
    assert all(loss == reference[step] for step, loss in superseded)


@pytest.mark.parametrize("preemption", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_a_final_checkpoint_and_exits_cleanly(tmp_path, reference, preemption):
    process = start_and_wait(tmp_path, lambda: max((s for s, _ in losses(tmp_path)), default=0) >= 2)
    process.send_signal(preemption)
    returncode = process.wait(timeout=300)
    assert returncode == 0, process.stderr.read()[-3000:]
    last_logged = max(s for s, _ in losses(tmp_path))
    assert committed_steps(tmp_path)[-1] == last_logged < STEPS
    run_to_end(tmp_path)
    assert_matches_reference(tmp_path, reference)
    assert committed_steps(tmp_path)[-1] == STEPS
