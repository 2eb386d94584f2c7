"""The default train command learns; several processes train exactly like one."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import make_train_iterator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from plamo_jax.configuration import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def run(args, devices=1, timeout=900, launcher="launch/train.py"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run(
        [sys.executable, launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def unigram_entropy_nats(config_module_path: str, steps: int) -> float:
    """Entropy of the target-token distribution over exactly the batches the run trains on."""
    config = load_recipe(ROOT / config_module_path)
    data = make_train_iterator(
        config.data,
        seq_len=config.train.seq_len,
        global_batch_size=config.train.global_batch_size,
        seed=config.train.seed,
    )
    counts = Counter()
    for _ in range(steps):
        batch = next(data)
        counts.update(batch["target_ids"][batch["loss_mask"] > 0].tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_default_run_learns_well_below_unigram_entropy(tmp_path):
    """`make train` = the tiny recipe's default run: loss ends far below the corpus unigram entropy;
    TensorBoard scalars, throughput, MFU, data statistics and checkpoints are written."""
    result = run(["--config", "configs/tiny.py", f"--config.train.output_dir={tmp_path}"])
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    entropy = unigram_entropy_nats("configs/tiny.py", steps=len(metrics))
    final = np.mean([m["cross_entropy"] for m in metrics[-10:]])
    print(f"unigram entropy {entropy:.3f} nats, final cross entropy {final:.3f} nats")
    assert final < 0.6 * entropy < metrics[0]["cross_entropy"]
    logged = [m for m in metrics if "perf/tokens_per_second" in m]
    assert logged and all(m["perf/mfu"] > 0 and m["data/packing_efficiency"] == 1.0 for m in logged)
    assert "documents" in result.stderr  # the data summary names what was read
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("loss")) == len(metrics)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == "300"


def test_two_processes_train_like_one(tmp_path):
    """2 hosts x 4 devices (jax.distributed over gloo) == 1 host x 8 devices, step by step."""
    common = [
        "--config",
        "configs/tiny.py",
        "--config.train.steps=4",
        "--config.checkpoint.enabled=False",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
    ]
    run([*common, f"--config.train.output_dir={tmp_path / 'one'}"], devices=8)
    run(
        [
            "--processes",
            "2",
            "--devices-per-process",
            "4",
            "--",
            *common,
            f"--config.train.output_dir={tmp_path / 'two'}",
        ],
        launcher="launch/local_multiprocess.py",
    )
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def test_moe_recipe_trains_with_expert_parallelism(tmp_path):
    """The MoE family through the same launcher: expert=4 x data=2, router losses and expert usage logged."""
    run(
        [
            "--config",
            "configs/moe_tiny.py",
            "--config.train.steps=6",
            "--config.checkpoint.enabled=False",
            "--config.mesh.expert=4",
            "--config.mesh.data=2",
            "--config.train.log_every=3",
            f"--config.train.output_dir={tmp_path}",
        ],
        devices=8,
    )
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 6
    assert all(m["load_balance_loss"] > 0 and m["router_z_loss"] > 0 for m in metrics)
    usage = [k for k in metrics[-1] if k.startswith("aux/tokens_per_expert/")]
    assert usage and sum(metrics[-1][k] for k in usage) > 0
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_continual_pretraining_starts_from_init_params(tmp_path):
    """checkpoint.init_params: a new run starts from given parameters; a different architecture is refused."""
    first = tmp_path / "first"
    run(
        [
            "--config",
            "configs/tiny.py",
            "--config.train.steps=40",
            "--config.checkpoint.every_steps=40",
            f"--config.train.output_dir={first}",
        ]
    )
    start = read_metrics(first)
    second = tmp_path / "second"
    run(
        [
            "--config",
            "configs/tiny.py",
            "--config.train.steps=2",
            "--config.checkpoint.enabled=False",
            f"--config.checkpoint.init_params={first / 'checkpoints'}",
            f"--config.train.output_dir={second}",
        ]
    )
    continued = read_metrics(second)
    assert continued[0]["cross_entropy"] < start[0]["cross_entropy"] - 1.0
    assert abs(continued[0]["cross_entropy"] - start[-1]["cross_entropy"]) < 0.5
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    refused = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            "configs/tiny.py",
            "--config.model.d_model=64",
            f"--config.checkpoint.init_params={first / 'checkpoints'}",
            f"--config.train.output_dir={tmp_path / 'x'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert "checkpoint.init_params" in refused.stderr and "model.d_model=64" in refused.stderr


def two_host_command(output_dir: Path, *overrides: str) -> list[str]:
    """The tiny recipe on 2 local processes of 1 CPU device each (jax.distributed over gloo)."""
    return [
        sys.executable,
        "launch/local_multiprocess.py",
        "--processes",
        "2",
        "--devices-per-process",
        "1",
        "--",
        "--config",
        "configs/tiny.py",
        *overrides,
        f"--config.train.output_dir={output_dir}",
    ]


def test_preempting_one_host_stops_and_saves_on_all(tmp_path):
    """SIGTERM to one of two processes: both save the same final step and exit cleanly (no hang)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    launcher = subprocess.Popen(
        two_host_command(
            tmp_path,
            "--config.train.steps=500",
            "--config.train.log_every=1",
            "--config.checkpoint.every_steps=1000",
        ),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 3:
            break
        time.sleep(0.5)
    workers = psutil.Process(launcher.pid).children()
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 writes the metrics
    assert launcher.wait(timeout=300) == 0, launcher.stderr.read()[-3000:]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == read_metrics(tmp_path)[-1]["step"] < 500


@pytest.mark.slow
def test_pipeline_stages_on_two_processes_train_like_one(tmp_path):
    """stage=2 outermost, so each of 2 processes x 4 devices holds one stage (activations cross the
    processes over gloo, and both read the same rows) == 1 process x 8 devices, step by step."""
    common = ["--config", "configs/tiny.py", "--config.train.steps=3", "--config.checkpoint.enabled=False",
              "--config.mesh.stage=2", "--config.mesh.data=2", "--config.mesh.tensor=2",
              "--config.model.pipeline_microbatches=4"]
    run([*common, f"--config.train.output_dir={tmp_path / 'one'}"], devices=8)
    run(["--processes", "2", "--devices-per-process", "4", "--", *common,
         f"--config.train.output_dir={tmp_path / 'two'}"], launcher="launch/local_multiprocess.py")
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def free_slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free on this machine."""
    import socket

    for job_id in np.random.default_rng().permutation(4096):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", 61440 + int(job_id)))
                return int(job_id)
            except OSError:
                continue
    raise RuntimeError("no free port in JAX's SLURM range")


def test_slurm_environment_starts_the_hosts_like_the_sbatch_script(tmp_path):
    """launch/slurm/train.sbatch runs `srun launch/train.py` with PLAMO_DISTRIBUTED=auto: two processes
    given SLURM's variables find each other and train exactly like one process with both devices."""
    common = ["--config", "configs/tiny.py", "--config.train.steps=3", "--config.checkpoint.enabled=False"]
    run([*common, f"--config.train.output_dir={tmp_path / 'one'}"], devices=2)
    job_id = free_slurm_job_id()
    processes = []
    for rank in range(2):
        slurm = dict(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                     SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_NODES="1")
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   PLAMO_DISTRIBUTED="auto", **slurm)
        processes.append(subprocess.Popen(
            [sys.executable, "launch/train.py", *common, f"--config.train.output_dir={tmp_path / 'slurm'}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "mesh {'stage': 1, 'data': 2," in outputs[0][1]  # one mesh over both processes' devices
    one, slurm = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "slurm")
    assert len(one) == len(slurm) == 3
    for a, b in zip(one, slurm, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
