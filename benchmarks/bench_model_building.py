"""PLaMo 2's model-building flow on the bundled tiny models, end to end, with the figures it measures.

Every step is the command a user runs (launch/train.py, tools/prune.py, tools/merge.py,
tools/evaluate.py), in a subprocess, in this order:

1. teacher: configs/tiny.py trained on 5/6 of the bundled corpus (the other sixth is held out);
2. prune the teacher to about half its parameters (d_model 96, mlp_dim 320, 2 query / 1 KV heads,
   3 of 4 layers), importance-ranked from 8 calibration batches of the training split, and the same
   shape with random indices;
3. students of that shape, the same steps and data: {pruned start, random start} x
   {distillation from the teacher (configs/distill_tiny.py: forward KL, T = 1), cross entropy only},
   and the pruned start distilled with train.distill_alpha = 0.5 (half KL, half cross entropy);
4. SFT of the pruned + distilled student on the bundled chat set (configs/sft_tiny.py), DPO of the
   SFT model on the bundled preference pairs (configs/dpo_tiny.py), and merges of those two
   fine-tunes (linear 0.5 / 0.5 and SLERP t = 0.5).

Printed: parameters and held-out cross entropy (nats per token) of every model; for the
post-trained ones also the bundled two-way preference choices (`builtin_choice`: the answer in the
asked language and form against one that ignores it, drawn apart from the DPO pairs) and exact match
of greedy answers to the bundled questions (`builtin_generation`).

    python benchmarks/bench_model_building.py [--work-dir runs/model_building] [--teacher-steps 300]
        [--student-steps 150] [--sft-steps 200] [--dpo-steps 100]

Asserts nothing; about 25 minutes on a 2-core machine. The work directory must be new or empty.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from plamo_jax.data.sources import read_builtin_documents
from plamo_jax.train import checkpoint as ckpt
from plamo_jax.train import state as state_lib

REPO = Path(__file__).resolve().parent.parent
PRUNED_SHAPE = {"d_model": 96, "mlp_dim": 320, "num_heads": 2, "num_kv_heads": 1, "num_layers": 3}


def command(args: list[str], log: Path) -> None:
    """Run one step of the flow (its output goes to `log`); stop the flow if it fails."""
    print("$", " ".join(args), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"the step above failed with exit status {done.returncode}; its output: {log}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def split_corpus(work: Path) -> tuple[Path, Path]:
    documents = read_builtin_documents()
    train, held_out = work / "train.jsonl", work / "held_out.jsonl"
    train.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                             for i, d in enumerate(documents) if i % 6))
    held_out.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                for i, d in enumerate(documents) if not i % 6))
    return train, held_out


def slug(name: str) -> str:
    """A file name for a model's label."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def shape_flags(shape: dict) -> list[str]:
    return [f"--config.model.{key}={value}" for key, value in shape.items()]


def parameter_count(checkpoint: Path) -> int:
    return state_lib.parameter_count(ckpt.load_params(checkpoint)[0])


def evaluate(checkpoint: Path, held_out: Path, work: Path, name: str, post_trained: bool) -> dict:
    out = work / "eval" / f"{name}.json"
    args = ["tools/evaluate.py", "--checkpoint", str(checkpoint), "--perplexity", str(held_out),
            "--seq-len", "128", "--batch-size", "16", "--output", str(out)]
    if post_trained:
        args += ["--multiple-choice", "builtin_choice", "--generation", "builtin_generation",
                 "--max-new-tokens", "24"]
    command(args, work / "logs" / f"eval_{name}.log")
    results = json.loads(out.read_text())
    row = {"cross_entropy": results["perplexity"][0]["cross_entropy"]}
    if post_trained:
        row["choice_accuracy"] = results["multiple_choice"][0]["accuracy"]
        row["exact_match"] = results["generation"][0]["exact_match"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/model_building")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--dpo-steps", type=int, default=100)
    args = parser.parse_args()
    work = (REPO / args.work_dir).resolve()
    if work.exists() and any(work.iterdir()):
        parser.error(f"--work-dir {work} is not empty; expected a new or empty directory")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "eval").mkdir(exist_ok=True)
    train, held_out = split_corpus(work)
    data = f"--config.data.source={train}"

    def train_run(name: str, recipe: str, steps: int, *flags: str) -> Path:
        command(["launch/train.py", "--config", f"configs/{recipe}.py", *flags,
                 f"--config.train.steps={steps}", f"--config.train.output_dir={work / name}"],
                work / "logs" / f"{name}.log")
        return work / name / "checkpoints"

    def merge_run(name: str, models: tuple[Path, ...], *flags: str) -> Path:
        command(["tools/merge.py", *flags, "--out", str(work / name), *map(str, models)],
                work / "logs" / f"{name}.log")
        return work / name

    teacher = train_run("teacher", "tiny", args.teacher_steps, data)

    target = [f"--{key.replace('_', '-')}={value}" for key, value in PRUNED_SHAPE.items()]
    calibration = ["--calibration", str(train), "--batches", "8"]
    command(["tools/prune.py", str(teacher), str(work / "pruned"), *target, *calibration],
            work / "logs" / "prune.log")
    command(["tools/prune.py", str(teacher), str(work / "pruned_random"), *target, *calibration,
             "--random-indices", "--seed", "0"], work / "logs" / "prune_random.log")

    shape = shape_flags(PRUNED_SHAPE)
    pruned_start = [f"--config.checkpoint.init_params={work / 'pruned'}"]
    distill, cross_entropy = ["--config.train.objective=distill"], ["--config.train.objective=lm"]
    half_and_half = [*distill, "--config.train.distill_alpha=0.5"]
    arms = {"pruned + distilled": pruned_start + distill,
            "pruned + cross entropy": pruned_start + cross_entropy,
            "pruned + distilled, alpha 0.5": pruned_start + half_and_half,
            "random + distilled": distill, "random + cross entropy": cross_entropy}
    students = {name: train_run(slug(name), "distill_tiny", args.student_steps, data, *shape, *flags,
                                f"--config.train.teacher_checkpoint={teacher}")
                for name, flags in arms.items()}

    # the SFT and DPO recipes read their own bundled chat / preference sets
    sft = train_run("sft", "sft_tiny", args.sft_steps, *shape,
                    f"--config.checkpoint.init_params={students['pruned + distilled']}")
    dpo = train_run("dpo", "dpo_tiny", args.dpo_steps, *shape, f"--config.checkpoint.init_params={sft}")
    merged_linear = merge_run("merged_linear", (sft, dpo), "--method", "linear", "--weights", "0.5,0.5")
    merged_slerp = merge_run("merged_slerp", (sft, dpo), "--method", "slerp", "--t", "0.5")

    models = {"teacher": teacher, "pruned (no training)": work / "pruned",
              "pruned, random indices (no training)": work / "pruned_random",
              **students,
              "SFT": sft, "DPO": dpo, "merge linear 0.5": merged_linear,
              "merge SLERP 0.5": merged_slerp}
    post_trained = {"SFT", "DPO", "merge linear 0.5", "merge SLERP 0.5", "pruned + distilled"}
    teacher_params = parameter_count(teacher)
    rows = {}
    for name, path in models.items():
        row = evaluate(path, held_out, work, slug(name), name in post_trained)
        row["params"] = parameter_count(path)
        rows[name] = row
    (work / "figures.json").write_text(json.dumps(rows, indent=2) + "\n")

    print(f"\nteacher {args.teacher_steps} steps; students {args.student_steps} steps; SFT {args.sft_steps}; "
          f"DPO {args.dpo_steps}. Held-out: every 6th bundled document.")
    print("| model | params | of teacher | held-out CE (nats/token) | preference choice acc | exact match |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        extra = (f"{row['choice_accuracy']:.3f} | {row['exact_match']:.3f}" if "choice_accuracy" in row
                 else "- | -")
        print(f"| {name} | {row['params']:,} | {row['params'] / teacher_params:.2f} | "
              f"{row['cross_entropy']:.3f} | {extra} |")
    print(f"figures: {work / 'figures.json'}")


if __name__ == "__main__":
    main()
