"""DPO: masks cover only responses, the loss equals a per-pair closed form, sharded/microbatched steps
equal the plain one, and the recipe raises the reward of the chosen answers; resume is exact."""

import json
import math
import shutil

import jax
import numpy as np
import pytest
from helpers import initial_host_params, mesh_of, small_config
from test_train_end_to_end import read_metrics, run

from plamo_jax.configuration import mesh_rules
from plamo_jax.errors import ConfigError, DataError
from plamo_jax.parallel.rules import sharding_context
from plamo_jax.posttrain.preference_data import builtin_preference_pairs
from plamo_jax.train import state as state_lib
from plamo_jax.train.checkpoint import load_params
from plamo_jax.train.objectives.dpo import DPO
from plamo_jax.train.optimizer import make_optimizer
from plamo_jax.train.run import validate
from plamo_jax.train.step import make_train_step

SEQ_LEN, BATCH = 96, 8


def dpo_config(**train):
    config = small_config(vocab_size=512)
    config.data.source, config.data.format = "builtin_preference", "preference"
    config.data.chat_template = "plain"
    config.train.objective, config.checkpoint.init_params = "dpo", "unused-by-these-tests"
    config.train.global_batch_size, config.train.seq_len = BATCH, SEQ_LEN
    config.train.update(train)
    return config


@pytest.fixture(scope="module")
def batch():
    data = DPO.make_iterator(dpo_config().data, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    return data, next(data)


def test_only_the_responses_are_scored(batch):
    data, host_batch = batch
    tokenizer = data.tokenizer
    answers = {(p["chosen"], p["rejected"]) for p in builtin_preference_pairs()}
    for row in range(BATCH):
        scored = [
            tokenizer.decode(host_batch[f"{side}_target_ids"][row][host_batch[f"{side}_loss_mask"][row] > 0])
            for side in ("chosen", "rejected")
        ]
        assert all(text.endswith("\n\n") for text in scored)  # the plain template's end of turn
        assert (scored[0][:-2], scored[1][:-2]) in answers
        prompt = tokenizer.decode(host_batch["chosen_input_ids"][row])
        assert prompt.startswith("### ") and "### assistant:\n" in prompt


def naive_dpo_loss(config, policy_params, reference_params, host_batch, beta):
    """Per pair, per side: the unpadded sequence alone through the model, closed-form DPO loss."""
    from flax import nnx

    from plamo_jax.models.decoder import Decoder

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(config.model, rngs=nnx.Rngs(0))))

    def log_prob(params, side, row):
        model = nnx.merge(graphdef, params)
        length = int(np.count_nonzero(host_batch[f"{side}_segment_ids"][row]))
        ids = host_batch[f"{side}_input_ids"][row, :length][None]
        logits, _ = model(ids, np.ones_like(ids), np.arange(length)[None])
        log_softmax = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1))
        targets = host_batch[f"{side}_target_ids"][row, :length]
        mask = host_batch[f"{side}_loss_mask"][row, :length]
        return float((log_softmax[np.arange(length), targets] * mask).sum())

    losses = []
    for row in range(BATCH):
        margin = beta * (
            (log_prob(policy_params, "chosen", row) - log_prob(reference_params, "chosen", row))
            - (log_prob(policy_params, "rejected", row) - log_prob(reference_params, "rejected", row))
        )
        losses.append(math.log1p(math.exp(-margin)))
    return float(np.mean(losses))


def run_dpo_step(config, mesh, host_policy, host_reference, host_batch):
    rules = mesh_rules(config)
    setup = state_lib.setup_model(config.model, mesh, rules)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    params = jax.device_put(host_policy, setup.param_shardings)
    reference = jax.device_put(host_reference, setup.param_shardings)
    state = state_lib.init_state(config.model, setup, optimizer, seed=0, params=params)
    batch = jax.device_put(host_batch, state_lib.batch_sharding(mesh, rules))
    with sharding_context(mesh, rules):
        step = jax.jit(make_train_step(DPO, config, setup.graphdef, optimizer))
        new_state, metrics = step(state, batch, reference)
    return jax.device_get((new_state["params"], metrics))


@pytest.fixture(scope="module")
def two_models():
    config = dpo_config()
    return initial_host_params(config, seed=0), initial_host_params(config, seed=1)


def test_dpo_loss_equals_the_per_pair_closed_form(batch, two_models):
    _, host_batch = batch
    policy, reference = two_models
    config = dpo_config(dpo_beta=0.5)
    _, metrics = run_dpo_step(config, mesh_of(data=1), policy, reference, host_batch)
    expected = naive_dpo_loss(config, policy, reference, host_batch, beta=0.5)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=2e-5)


def test_dpo_starts_at_log_two_when_the_policy_is_the_reference(batch, two_models):
    _, host_batch = batch
    policy, _ = two_models
    _, metrics = run_dpo_step(dpo_config(), mesh_of(data=1), policy, policy, host_batch)
    np.testing.assert_allclose(metrics["loss"], math.log(2), rtol=1e-6)
    assert abs(metrics["reward_margin"]) < 1e-5 and metrics["grad_norm"] > 0


@pytest.mark.parametrize(
    "mesh_sizes,microbatches",
    [(dict(data=1), 2), (dict(data=2, fsdp=2, tensor=2), 1), (dict(fsdp=4), 2)],
    ids=["microbatches=2", "data=2,fsdp=2,tensor=2", "fsdp=4,microbatches=2"],
)
def test_sharded_and_accumulated_dpo_steps_equal_the_plain_step(batch, two_models, mesh_sizes, microbatches):
    _, host_batch = batch
    policy, reference = two_models
    expected_params, expected = run_dpo_step(dpo_config(), mesh_of(data=1), policy, reference, host_batch)
    config = dpo_config(microbatches=microbatches)
    config.mesh.update(mesh_sizes)
    params, metrics = run_dpo_step(config, mesh_of(**mesh_sizes), policy, reference, host_batch)
    for name in ("loss", "reward_margin", "chosen_log_prob", "grad_norm"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, expected_params)


def test_dpo_config_errors_name_the_key(tmp_path):
    config = dpo_config()
    config.checkpoint.init_params = ""
    with pytest.raises(ConfigError, match="checkpoint.init_params.*frozen reference"):
        validate(config, 1)
    config = dpo_config()
    config.data.format = "chat"
    with pytest.raises(ConfigError, match="data.format='chat'.*'preference'"):
        validate(config, 1)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    config = dpo_config()
    config.data.source, config.data.on_bad_input = str(path), "fail"
    with pytest.raises(DataError, match=r"pairs.jsonl:1: bad_pair: no 'rejected' field"):
        DPO.make_iterator(config.data, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)


@pytest.mark.slow  # minutes of training; the default suite keeps the faster checks of the same code
def test_dpo_recipe_prefers_the_chosen_answers_and_resumes_exactly(tmp_path):
    """SFT a tiny model briefly, then configs/dpo_tiny.py from it: the first loss is log 2, the reward
    margin turns positive and most pairs are ranked right; 30 + 30 steps equal 60 straight."""
    sft = tmp_path / "sft"
    run(["--config", "configs/sft_tiny.py", f"--config.train.output_dir={sft}", "--config.train.steps=60",
         "--config.checkpoint.init_params=", "--config.optimizer.learning_rate=3e-3"])
    common = ["--config", "configs/dpo_tiny.py", f"--config.checkpoint.init_params={sft}/checkpoints",
              "--config.train.steps=60", "--config.checkpoint.every_steps=30"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*common, f"--config.train.output_dir={straight}"])
    metrics = read_metrics(straight)
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-5
    assert np.mean([m["reward_accuracy"] for m in metrics[-20:]]) > 0.7
    assert np.mean([m["reward_margin"] for m in metrics[-20:]]) > 0

    # Resume from the straight run's step-30 checkpoint alone (the reference is reloaded from init_params).
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "60")
    run([*common, f"--config.train.output_dir={resumed}"])
    a, _ = load_params(straight / "checkpoints", step=60)
    b, _ = load_params(resumed / "checkpoints", step=60)
    jax.tree.map(np.testing.assert_array_equal, a, b)


USER = [{"role": "user", "content": "2+2?"}]
ANSWER, WRONG = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("record", [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "2+2?", "chosen": USER + ANSWER, "rejected": USER + WRONG},
    {"chosen": USER + ANSWER, "rejected": USER + WRONG},
], ids=["separate-prompt", "ultrafeedback-style", "hh-rlhf-style"])
def test_public_preference_layouts_give_the_same_pair(record):
    from plamo_jax.posttrain.preference_data import split_pair

    assert split_pair(record) == (USER, ANSWER, WRONG)
    assert "share no beginning" in split_pair({"chosen": "4", "rejected": "5"})
    assert "no assistant message after the prompt" in split_pair({"prompt": USER, "chosen": USER,
                                                                  "rejected": USER + WRONG})
