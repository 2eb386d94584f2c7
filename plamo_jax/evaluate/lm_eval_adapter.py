"""lm-evaluation-harness model `plamo_jax`: any harness task on our JAX forward pass, sharded, from an Orbax
checkpoint (no export to Hugging Face format).

    python tools/lm_eval_harness.py --model plamo_jax --model_args checkpoint=runs/x/checkpoints --tasks ...
    # model_args: checkpoint (required), step, batch_size, max_length (default: train.seq_len),
    # max_gen_toks (256), add_bos_token (default: data.add_bos), kv_cache (True), and mesh sizes by axis
    # name (data, fsdp, tensor, expert, sequence; data takes the remaining devices), e.g. tensor=2

In Python, importing this module registers the name: `lm_eval.simple_evaluate(model="plamo_jax", ...)`.
lm-eval 0.4 finds models only in its own registry (no plugin entry points), hence tools/lm_eval_harness.py:
lm-eval's own command line with this module imported first.

Requests are tokenized by lm-eval's `TemplateLM` (context / continuation split, empty contexts get
the prefix token) exactly as for its `hf` model; `loglikelihood_rolling` uses lm-eval's own rolling
windows; `generate_until` decodes in batches with the KV cache (evaluate/generate.py), stopping each
row at EOS, `max_gen_toks` or one of its `until` strings. With several hosts every process runs the
same command (one SPMD program); each computes every request and prints the same results.
"""

from __future__ import annotations

from typing import Any

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from plamo_jax.data.tokenizer import tokenizer_from_config
from plamo_jax.errors import ConfigError
from plamo_jax.evaluate.batching import batch_shard_count, round_up
from plamo_jax.evaluate.generate import Sampling, generator_for
from plamo_jax.evaluate.scoring import ContinuationScorer
from plamo_jax.parallel.rules import MESH_AXES
from plamo_jax.train.checkpoint import load_config, load_params
from plamo_jax.train.run import build_model

MODEL_NAME = "plamo_jax"
DEFAULT_BATCH_SIZE = 8


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"model_args {name}={value!r}: expected True or False")


@register_model(MODEL_NAME)
class PlamoJaxLM(TemplateLM):
    """An Orbax checkpoint of any family as an lm-eval language model."""

    def __init__(self, checkpoint: str, step: int | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 kv_cache: bool = True, max_batch_size: int | None = None, device: str | None = None,
                 **mesh_sizes: int):
        super().__init__()
        del max_batch_size, device  # lm-eval passes these to every model; the mesh decides placement
        unknown = sorted(set(mesh_sizes) - set(MESH_AXES))
        if unknown:
            raise ConfigError(f"model_args {unknown}: not understood; expected checkpoint, step, batch_size, "
                              f"max_length, max_gen_toks, add_bos_token, kv_cache or mesh sizes {MESH_AXES}")
        config = load_config(checkpoint, step)
        config.mesh.update({"data": -1, **{axis: int(size) for axis, size in mesh_sizes.items()}})
        self.run = build_model(config)
        params, _ = load_params(checkpoint, step, shardings=self.run.setup.param_shardings)
        self.tokenizer = tokenizer_from_config(config.data)
        self._max_length = int(max_length or config.train.seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(config.data.add_bos) if add_bos_token is None else _flag(add_bos_token,
                                                                                           "add_bos_token")
        if str(batch_size).startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE  # no memory probing: the batch is a mesh-wide choice
        self.batch_rows = round_up(int(batch_size), batch_shard_count(self.run))
        pad_id = self.tokenizer.pad_id
        self.scorer = ContinuationScorer(self.run, params, batch_size=self.batch_rows, pad_id=pad_id)
        self.generator = generator_for(self.run, params, pad_id=pad_id,
                                       cached=None if _flag(kv_cache, "kv_cache") else False)
        self.checkpoint = checkpoint

    # -- what TemplateLM asks ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # the token documents start with (EOS for GPT-2-style vocabularies)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids with BOS in front as the model was trained (add_bos_token), unless already there."""
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer.encode(string)
        if add_bos and not (add_special_tokens is None and ids[:1] == [self.tokenizer.bos_id]):
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        sequences = []
        for _, context_enc, continuation_enc in requests:
            window = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :]
            sequences.append((window, min(len(continuation_enc), len(window) - 1)))
        scores = [(s.log_prob, s.greedy) for s in self.scorer.score(sequences)]
        for (key, _, _), score in zip(requests, scores, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(request.args), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_rows):
                chunk = indices[start : start + self.batch_rows]
                texts = self._generate([requests[i].args[0] for i in chunk], requests[chunk[0]].args[1])
                for index, text in zip(chunk, texts, strict=True):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", tuple(requests[index].args), text)
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # EOS stops by its id
        max_new = int(kwargs.pop("max_gen_toks"))
        context_room = self.max_length - max_new
        if context_room <= 0:
            raise ConfigError(f"max_gen_toks={max_new} leaves no room for a context in max_length="
                              f"{self.max_length}; expected max_gen_toks < max_length")
        sampling = Sampling()
        if kwargs.get("do_sample"):
            sampling = Sampling(float(kwargs.get("temperature", 1.0)), float(kwargs.get("top_p", 1.0)),
                                int(kwargs.get("seed", 0)))
        prompts = [self.tok_encode(context)[-context_room:] for context in contexts]

        def reached_stop_string(row: int, ids: list[int]) -> bool:
            text = self.tokenizer.decode(ids)
            return any(term and term in text for term in until)

        outputs = self.generator.generate(prompts, max_new_tokens=max_new, stop_ids=(self.eot_token_id,),
                                          stop=reached_stop_string if until else None, sampling=sampling)
        return [postprocess_generated_text(self.tokenizer.decode(ids[:max_new]), until, None)
                for ids in outputs]

    # -- reporting --------------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        return {"model_source": MODEL_NAME, "checkpoint": self.checkpoint,
                "family": self.run.config.model.family, "devices": jax.device_count()}
