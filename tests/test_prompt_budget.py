"""The context budget: prompts fit `max_prompt_tokens` by dropping the least relevant documents,
never the question or the history, and the stages count the examples that lost documents."""
import logging

import pytest

from steps.core.prompts import PromptBudgetError, build, fit_documents, prompt_size, relevance_order
from tests.helpers import TINY_DENSE, examples, tiny_model


def words(example: dict) -> int:
    return sum(len(t["content"].split()) for t in example["history"]) + len(example["question"].split()) + sum(
        len(d.split()) for d in example["documents"])


@pytest.fixture
def example() -> dict:
    # Overlap with the question ("where", "zono", "born"): doc 0 shares 2, doc 1 none, doc 2 one
    # ("zono"), doc 3 none. Least relevant first: 3, then 1 (the later of the two with none), 2, 0.
    return {"id": "x1", "dataset": "musique", "question": "where was zono born ?",
            "history": [{"role": "user", "content": "tell me about zono ."}],
            "documents": ["zono was born in dadada .", "kestria is far .", "zono works in dakasu .", "cats sleep ."],
            "answers": ["dadada"], "gold_doc_idxs": [0], "helpful_doc_idxs": [], "bridge": [], "hops": 1}


def test_relevance_order_is_by_overlap_with_question_and_history_then_later_first(example):
    assert relevance_order(example) == [3, 1, 2, 0]
    # The history counts: once it names kestria, doc 1 outranks the unrelated doc 3 and ties doc 2.
    example["history"] = [{"role": "user", "content": "zono and kestria ."}]
    assert relevance_order(example) == [3, 2, 1, 0]


def test_exactly_at_budget_drops_nothing_and_one_under_drops_the_least_relevant(example):
    full = words(example)
    assert fit_documents(example, words, full) == 0
    assert fit_documents(example, words, full - 1) == 1  # doc 3: "cats sleep ." is 3 words
    assert fit_documents(example, words, full - 3) == 1
    assert fit_documents(example, words, full - 4) == 2  # then doc 1


def test_question_and_history_are_never_cut(example):
    bare = words({**example, "documents": []})
    assert fit_documents(example, words, bare) == 4
    with pytest.raises(PromptBudgetError, match=r"example 'x1'.*question and history alone take 10 tokens.*=9"):
        fit_documents(example, words, bare - 1)


def test_build_counts_real_tokens_and_keeps_the_rest_in_order(example, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model(tmp_path / "m", TINY_DENSE, examples() + [example]))
    n = prompt_size(tok)(example)
    assert n == len(tok(build(example, tok).text, add_special_tokens=False)["input_ids"])
    at = build(example, tok, max_prompt_tokens=n)
    assert at.text == build(example, tok).text and at.meta["dropped_documents"] == 0
    under = build(example, tok, max_prompt_tokens=n - 1)
    assert under.meta["dropped_documents"] == 1 and "cats sleep" not in under.text
    assert "[1] zono was born in dadada . [2] kestria is far . [3] zono works in dakasu ." in under.text
    assert example["question"] in under.text and under.messages[0]["content"] == "tell me about zono ."
    assert len(tok(under.text, add_special_tokens=False)["input_ids"]) <= n - 1


def test_without_a_tokenizer_words_of_the_messages_stand_in_for_tokens(example):
    n = prompt_size(None)(example)
    assert n == sum(len(m["content"].split()) for m in build(example, None).messages)
    assert build(example, None, max_prompt_tokens=n).meta["dropped_documents"] == 0
    prompt = build(example, None, max_prompt_tokens=n - 1)
    assert prompt.text == "" and prompt.meta["dropped_documents"] == 1 and "cats" not in prompt.messages[-1]["content"]


def test_sample_and_evaluate_count_the_examples_cut_and_say_so(tmp_path, caplog):
    from transformers import AutoTokenizer

    from steps.evaluate import EvaluateConfig, evaluate_model
    from steps.sample import SampleConfig, sample

    rows = examples()
    model = tiny_model(tmp_path / "m", TINY_DENSE, rows)
    tok = AutoTokenizer.from_pretrained(model)
    sizes = sorted(prompt_size(tok)(e) for e in rows)
    budget = sizes[-3]  # the two longest prompts (distinct lengths) must lose documents
    assert sizes[-3] < sizes[-2]
    with caplog.at_level(logging.WARNING):
        cands, cut = sample(SampleConfig(k=1, max_new_tokens=2, max_prompt_tokens=budget), rows, str(model),
                            tmp_path / "s")
    assert cut == 2 and len(cands) == len(rows)
    assert "sample: 2 of 10 prompts exceeded max_prompt_tokens" in caplog.text
    cfg = EvaluateConfig(max_new_tokens=2, latency_probe_n=0, max_prompt_tokens=budget)
    _, stats = evaluate_model(cfg, "teacher", str(model), rows, tmp_path / "e")
    assert stats["prompts_over_budget"] == 2
    assert "evaluate: teacher: 2 of 10 prompts exceeded" in caplog.text
