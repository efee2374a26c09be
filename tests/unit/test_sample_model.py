"""The sample workers' n-gram text model: tokenizer, determinism, prefill, decode, finish reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sample_infra.model import (
    CORPUS_DIR,
    MAX_PROMPT_TOKENS,
    TextModel,
    count_tokens,
    default_model,
    detokenize,
    tokenize,
)
from tmb.errors import InputError

PROMPTS = ["Tell me about the kitchen.", "The ledger", "", "zzz qqq unknown words", "Rain came late"]


def test_tokenizer() -> None:
    assert tokenize("The crate's seal, (stamped) at 9am!") == [
        "The", "crate", "'", "s", "seal", ",", "(", "stamped", ")", "at", "9am", "!",
    ]  # fmt: skip
    assert count_tokens("The crate's seal, (stamped) at 9am!") == 12
    assert count_tokens("") == 0 and count_tokens("  \n\t ") == 0
    assert detokenize(["Hello", ",", "(", "big", ")", "world", "."]) == "Hello, (big) world."


@given(st.lists(st.sampled_from(["a", "Word", "42", "é", "_x", ".", ",", "(", ")", "'", "-", "!", "["])))
def test_detokenize_round_trips(tokens: list[str]) -> None:
    assert tokenize(detokenize(tokens)) == tokens
    assert tokenize("x" + detokenize(tokens, prev="x")) == ["x", *tokens]


def test_deterministic_for_a_seed() -> None:
    model = default_model()
    again = TextModel.from_dir(CORPUS_DIR)
    assert again.digest == model.digest and again.vocab_size == model.vocab_size > 300
    for prompt in PROMPTS:
        runs = []
        for m in (model, again, model):
            g = m.start(prompt, max_tokens=40, seed=7)
            list(g)
            runs.append((g.tokens, g.finish_reason))
        assert runs[0] == runs[1] == runs[2] and runs[0][0]
    outputs = set()
    for seed in range(5):
        g = model.start("The workshop", max_tokens=30, seed=seed, ignore_eos=True)
        outputs.add("".join(g))
    assert len(outputs) >= 3  # the seed matters


def test_generation_text_matches_tokens() -> None:
    model = default_model()
    for seed, prompt in enumerate(PROMPTS):
        g = model.start(prompt, max_tokens=50, seed=seed, temperature=0.8, top_p=0.9)
        text = "".join(g)
        assert text == g.text and tokenize(text) == g.tokens and count_tokens(text) == len(g.tokens)
        assert g.finish_reason in ("stop", "length") and g.step() is None
        # Completions continue the prompt: prompt + text re-tokenizes into prompt tokens + generated tokens.
        c = model.start(prompt, max_tokens=20, seed=seed, continue_prompt=True)
        assert count_tokens(prompt + "".join(c)) == c.prompt_tokens + len(c.tokens)


def test_prefill_counts_prompt_tokens_and_bounds_it() -> None:
    model = default_model()
    assert model.start("user: hello there\nassistant:").prompt_tokens == 6
    assert model.start("").prompt_tokens == 0
    with pytest.raises(InputError, match="context"):
        model.start("word " * (MAX_PROMPT_TOKENS + 1))


def test_finish_reasons() -> None:
    model = default_model()
    g = model.start("the", max_tokens=300, seed=0, ignore_eos=True)
    assert len(list(g)) == 300 and g.finish_reason == "length"
    stops = []
    for seed in range(60):
        g = model.start("The kitchen", max_tokens=400, seed=seed)
        list(g)
        if g.finish_reason == "stop":
            stops.append(len(g.tokens))
    assert stops and all(n < 400 for n in stops)  # paragraph ends are an end-of-text token


def test_greedy_ignores_the_seed() -> None:
    model = default_model()
    a = model.start("The river", max_tokens=25, seed=1, temperature=0.0, ignore_eos=True)
    b = model.start("The river", max_tokens=25, seed=2, temperature=0.0, ignore_eos=True)
    assert list(a) == list(b)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": 0}, {"max_tokens": 5000}, {"temperature": -1.0}, {"temperature": float("nan")},
     {"top_p": 0.0}, {"top_p": 1.5}],
)  # fmt: skip
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError):
        default_model().start("hi", **kwargs)  # type: ignore[arg-type]


def test_bad_training_text(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no \.txt"):
        TextModel.from_dir(tmp_path)
    with pytest.raises(InputError, match=r"no \.txt"):
        TextModel.from_dir(tmp_path / "missing")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InputError, match="cannot read"):
        TextModel.from_dir(tmp_path)
    with pytest.raises(InputError, match="paragraph"):
        TextModel(["", "  \n\n  "])
    small = TextModel(["One two three. Four five six."], order=2)
    assert "".join(small.start("two", max_tokens=3, temperature=0.0, ignore_eos=True)) == "Three. Four"
