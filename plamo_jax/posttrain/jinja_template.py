"""A tokenizer's own Jinja chat template (tokenizer_config.json), with exact assistant-token masks.

The conversation is rendered once and tokenized with character offsets. Assistant message i spans
from the end of render(messages[:i], add_generation_prompt=True) to the end of
render(messages[:i + 1]); tokens starting inside a span are learned. This needs a template whose
renderings extend each other (true of the usual ones); one that does not is an error naming it.
`{% generation %}` blocks (transformers' assistant markers) are accepted and rendered as is.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from plamo_jax.errors import DataError


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _to_json(value, **options) -> str:
    return json.dumps(value, ensure_ascii=False, **options)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


class JinjaChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str, where: str):
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlocks, jinja2.ext.loopcontrols],
        )
        environment.filters["tojson"] = _to_json
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.where = where
        self.special = {"bos_token": bos_token, "eos_token": eos_token}
        try:
            self._template = environment.from_string(source)
        except jinja2.exceptions.TemplateError as error:
            raise DataError(f"chat template of {where} does not parse: {error}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except jinja2.exceptions.TemplateError as error:
            raise DataError(f"chat template of {self.where} failed: {error}") from None

    def assistant_spans(self, messages: list[dict], first_learned: int) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of assistant messages from `first_learned` on."""
        text = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or index < first_learned:
                continue
            before = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(
                    f"chat template of {self.where} does not render conversations incrementally, so the "
                    "assistant tokens cannot be located; set data.chat_template to a named template"
                )
            spans.append((len(before), len(through)))
        return text, spans


def render_with_template(
    messages: list[dict], tokenizer, template: JinjaChatTemplate, first_learned: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, target mask) of a conversation under the tokenizer's template (it places BOS/EOS)."""
    text, spans = template.assistant_spans(messages, first_learned)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.array([start for start, _ in offsets], np.int64)
    mask = np.zeros(len(ids), np.uint8)
    for begin, end in spans:
        mask[(starts >= begin) & (starts < end)] = 1
    return np.asarray(ids, np.int32), mask
