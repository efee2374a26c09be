"""The sample workers' text model: a small word n-gram model of our own, on a CPU, nothing downloaded.

No package in reach ships a text generator that runs on a CPU without downloading weights, so the sample
workers use this one (see docs/sample-infra.md). It is counted from the bundled paragraphs in
``sample_infra/corpus/*.txt`` (or any directory of ``.txt`` files: the demo commits that directory as the
model) and behaves like a language model where the demo needs it to:

* a tokenizer: words and single punctuation marks (:func:`tokenize`, :func:`count_tokens`); detokenizing
  and re-tokenizing any generation gives back exactly its tokens, so usage counts can be checked on the text;
* a prefill step linear in the prompt length (:meth:`TextModel.start` walks every prompt token);
* a decode step per token (:meth:`Generation.step`): back-off n-gram sampling with temperature and top-p,
  and an end-of-text token at paragraph ends (``finish_reason`` ``stop``; never the first token) unless
  ``ignore_eos``;
* determinism: the same model, prompt and seed give the same tokens, on any machine.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tmb.errors import InputError

__all__ = [
    "CORPUS_DIR",
    "EOS",
    "MAX_PROMPT_TOKENS",
    "Generation",
    "TextModel",
    "count_tokens",
    "default_model",
    "detokenize",
    "tokenize",
]

CORPUS_DIR: Final = Path(__file__).with_name("corpus")
EOS: Final = "<|eos|>"
MAX_PROMPT_TOKENS: Final = 32768
_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")
_NO_SPACE_BEFORE: Final = frozenset(".,;:!?)]}%'")
_NO_SPACE_AFTER: Final = frozenset("([{")


def tokenize(text: str) -> list[str]:
    """Words (``\\w+``) and single non-space, non-word characters, in order."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """How many tokens :func:`tokenize` finds in ``text``."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def piece(prev: str | None, token: str) -> str:
    """``token`` as it is written after ``prev``: a leading space unless punctuation rules say otherwise."""
    if prev is None or token in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER:
        return token
    return " " + token


def detokenize(tokens: Sequence[str], prev: str | None = None) -> str:
    """Text for ``tokens`` (continuing after ``prev``); :func:`tokenize` of it gives ``tokens`` back."""
    out = []
    for tok in tokens:
        out.append(piece(prev, tok))
        prev = tok
    return "".join(out)


@dataclass
class Generation:
    """One request's decode loop; :meth:`step` yields the next text piece, None when finished.

    ``finish_reason`` is ``None`` while running, then ``"stop"`` (end-of-text token) or ``"length"``
    (``max_tokens`` reached). ``tokens`` are the tokens emitted so far (the end-of-text token is not one).
    """

    model: TextModel
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool
    context: list[str]
    prev: str | None
    rng: random.Random
    tokens: list[str] = field(default_factory=list)
    finish_reason: str | None = None

    def step(self) -> str | None:
        """Decode one token: its text piece, or None when the generation is finished."""
        if self.finish_reason is not None:
            return None
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            return None
        no_eos = self.ignore_eos or not self.tokens  # at least one token, even after a sentence end
        tok = self.model.sample(self.context, self.rng, self.temperature, self.top_p, no_eos)
        if tok == EOS:
            self.finish_reason = "stop"
            return None
        if self.prev is None:
            tok = tok[:1].upper() + tok[1:]  # fresh text starts with a capital
        text = piece(self.prev, tok)
        self.tokens.append(tok)
        self.prev = tok
        self.context = [*self.context, tok.lower()][-(self.model.order - 1) :]
        return text

    def __iter__(self) -> Iterator[str]:
        while (text := self.step()) is not None:
            yield text

    @property
    def text(self) -> str:
        """Everything generated so far, as one string."""
        return detokenize(self.tokens)


class TextModel:
    """A back-off word n-gram model (``order`` 3: two words of context) counted from paragraphs of text."""

    def __init__(self, texts: Sequence[str], *, order: int = 3, name: str = "tmb-sample-ngram") -> None:
        if order < 1:
            raise InputError("n-gram order must be at least 1", order=order)
        self.order, self.name = order, name
        counts: dict[tuple[str, ...], dict[str, int]] = {}
        paragraphs = 0
        for text in texts:
            for para in re.split(r"\n\s*\n", text):
                toks = tokenize(para)
                if not toks:
                    continue
                paragraphs += 1
                keys = [t.lower() for t in toks]
                for i, tok in enumerate([*toks, EOS]):
                    for k in range(order):
                        if k > i:
                            break
                        ctx = tuple(keys[i - k : i])
                        bucket = counts.setdefault(ctx, {})
                        bucket[tok] = bucket.get(tok, 0) + 1
        if not paragraphs:
            raise InputError("the text model needs at least one non-empty paragraph of training text")
        self._table = {ctx: (tuple(c), tuple(c.values())) for ctx, c in counts.items()}
        self.vocab_size = len(counts[()]) - 1
        self.paragraphs = paragraphs
        h = hashlib.sha256(f"tmb-ngram\0{order}\0".encode())
        for text in texts:
            h.update(hashlib.sha256(text.encode()).digest())
        self.digest = h.hexdigest()

    @classmethod
    def from_dir(cls, path: Path, *, order: int = 3) -> TextModel:
        """The model counted from every ``*.txt`` file in ``path``, in name order."""
        files = sorted(path.glob("*.txt")) if path.is_dir() else []
        if not files:
            raise InputError("model directory has no .txt training files", path=str(path))
        try:
            texts = [f.read_text(encoding="utf-8") for f in files]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read training text: {exc}", path=str(path)) from None
        return cls(texts, order=order, name=f"tmb-sample-ngram:{path.name}")

    def start(
        self,
        prompt: str,
        *,
        max_tokens: int = 64,
        seed: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        ignore_eos: bool = False,
        continue_prompt: bool = False,
    ) -> Generation:
        """Prefill ``prompt`` (work linear in its tokens) and return the decode loop.

        Deterministic in (model, prompt, seed, parameters). ``continue_prompt`` spaces the first piece as
        a continuation of the prompt's last token (completions) instead of starting fresh text (chat).
        """
        if not (1 <= max_tokens <= 4096):
            raise InputError("max_tokens must be between 1 and 4096", max_tokens=max_tokens)
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise InputError("temperature must be between 0 and 2", temperature=temperature)
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise InputError("top_p must be in (0, 1]", top_p=top_p)
        context: list[str] = []
        n = 0
        last: str | None = None
        for m in _TOKEN_RE.finditer(prompt):  # the prefill: one pass over every prompt token
            last = m.group()
            context.append(last.lower())
            if len(context) >= self.order:
                del context[0]
            n += 1
        if n > MAX_PROMPT_TOKENS:
            raise InputError("prompt is longer than the model's context", tokens=n, limit=MAX_PROMPT_TOKENS)
        key = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
        return Generation(
            model=self,
            prompt_tokens=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            ignore_eos=ignore_eos,
            context=context[-(self.order - 1) :] if self.order > 1 else [],
            prev=last if continue_prompt else None,
            rng=random.Random(int.from_bytes(key[:16], "big")),
        )

    def sample(
        self, context: Sequence[str], rng: random.Random, temperature: float, top_p: float, ignore_eos: bool
    ) -> str:
        """One decode step: the next token after ``context`` (lower-cased), backing off to shorter ones."""
        for k in range(min(len(context), self.order - 1), -1, -1):
            entry = self._table.get(tuple(context[len(context) - k :]))
            if entry is None:
                continue
            toks, counts = entry
            pairs = [(t, c) for t, c in zip(toks, counts, strict=True) if not (ignore_eos and t == EOS)]
            if pairs:
                return _draw(pairs, rng, temperature, top_p)
        raise AssertionError("the unigram table always has a word")  # pragma: no cover


def _draw(pairs: list[tuple[str, int]], rng: random.Random, temperature: float, top_p: float) -> str:
    if temperature == 0.0:
        return max(pairs, key=lambda p: p[1])[0]  # first of the most frequent: deterministic
    weights = [c ** (1.0 / temperature) for _, c in pairs]
    if top_p < 1.0:
        order = sorted(range(len(pairs)), key=lambda i: -weights[i])
        keep, total, cut = [], 0.0, top_p * sum(weights)
        for i in order:
            keep.append(i)
            total += weights[i]
            if total >= cut:
                break
        pairs, weights = [pairs[i] for i in keep], [weights[i] for i in keep]
    x = rng.random() * sum(weights)
    for (tok, _), w in zip(pairs, weights, strict=True):
        x -= w
        if x < 0:
            return tok
    return pairs[-1][0]


@functools.lru_cache(maxsize=1)
def default_model() -> TextModel:
    """The model counted from the bundled corpus (built once per process, on first use)."""
    return TextModel.from_dir(CORPUS_DIR)
