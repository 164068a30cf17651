"""Each stage's core on tiny in-memory rows and tiny real models."""
import pytest

from steps.core.backends import SamplingParams, make_backend
from steps.core.judges import RuleJudge
from steps.core.prompts import render, split_completion
from steps.core.schemas import CANDIDATES, JUDGED, PREDICTIONS, validate
from tests.helpers import TINY_DENSE, examples, tiny_model


@pytest.fixture(scope="module")
def rows():
    return examples()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, rows):
    return tiny_model(tmp_path_factory.mktemp("m") / "dense", TINY_DENSE, rows)


def test_split_completion():
    assert split_completion("<think> a b </think> c d") == ("a b", "c d")
    assert split_completion("<think> a b") == ("a b", "")
    assert split_completion("plain answer") == ("", "plain answer")


def test_prompt_uses_the_tokenizers_chat_template(rows, model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    ecommerce = next(r for r in rows if r["dataset"] == "ecommerce")
    p = render(ecommerce, tok)
    assert p.text.startswith("<user> i like the") and p.text.endswith("<assistant> ")
    assert ecommerce["question"] in p.text and all(d in p.text for d in ecommerce["documents"])
    assert "[UNK]" not in tok.decode(tok(p.text)["input_ids"])


def test_sample_core_resumes_without_duplicates(rows, model_dir, tmp_path):
    from steps.sample import SampleConfig, sample
    cfg = SampleConfig(k=3, max_new_tokens=8, shard_size=4, backend_options={"batch_size": 6})
    work = tmp_path / "work"
    first, _ = sample(cfg, rows[:4], str(model_dir), work)
    assert len(first) == 12
    again, over_budget = sample(cfg, rows, str(model_dir), work)  # 4 done, 6 new
    validate(again, CANDIDATES, "candidates.jsonl")
    assert [(r["id"], r["sample_idx"]) for r in again] == [(e["id"], j) for e in rows for j in range(3)]
    assert again[:12] == first
    # An untrained model may end a sample at once (EOS first): only the budget is exact.
    assert all(r["completion_tokens"] <= 8 for r in again) and sum(r["completion_tokens"] for r in again) > 0
    assert over_budget == 0


def test_transformers_backend_greedy_is_deterministic(rows, model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = make_backend("transformers", model=str(model_dir), batch_size=4)
    prompts = [render(e, tok) for e in rows]
    a = backend.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    b = backend.generate(prompts[::-1], SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    assert [x[0].text for x in a] == [x[0].text for x in b[::-1]]


def test_judge_core_keeps_correct_and_helpful(rows):
    from steps.judge import JudgeConfig, judge
    m = next(r for r in rows if r["dataset"] == "musique")
    good = f"the answer is {m['answers'][0]} . " + " ".join(m["documents"][i] for i in m["helpful_doc_idxs"])
    cands = [{"id": m["id"], "dataset": "musique", "sample_idx": j, "completion": f"<think> x </think> {resp}",
              "thinking": "x", "response": resp, "completion_tokens": 5, "finish_reason": "stop", "model": "t"}
             for j, resp in enumerate([good, f"the answer is {m['answers'][0]} .", "the answer is nowhere ."])]
    judged, kept, st = judge(JudgeConfig(), rows, cands)
    validate(judged, JUDGED, "judged.jsonl")
    assert [(r["correct"], r["helpful"], r["keep"]) for r in judged] == [(1, 1, True), (1, 0, False), (0, 0, False)]
    assert [r["sample_idx"] for r in kept] == [0]
    assert st["musique"]["keep_rate"] == pytest.approx(1 / 3)
    _, kept_all, _ = judge(JudgeConfig(keep="all"), rows, cands)
    assert len(kept_all) == 3


def test_rule_judge_ecommerce_grounding(ecommerce_example):
    def ch(response):
        v = RuleJudge().judge_one(ecommerce_example, response)
        return v.correct, v.helpful
    assert ch("the tolka lamp is green . the tolka lamp is made of glass .") == (1, 1)
    assert ch("the tolka lamp is red .") == (0, 0)  # grounded in a lure document, but wrong
    assert ch("the tolka lamp is green . it has a ten year warranty .") == (0, 0)  # an ungrounded claim
    assert ch("") == (0, 0)


def test_evaluate_core_scores_resumes_and_the_report_summarises(rows, model_dir, tmp_path):
    from steps.evaluate import EvaluateConfig, evaluate_model
    from steps.report import Claim, check_claims, markdown, summarise
    cfg = EvaluateConfig(max_new_tokens=6, latency_probe_n=2, backend_options={"batch_size": 8})
    preds, stats = evaluate_model(cfg, "teacher", str(model_dir), rows, tmp_path / "w")
    validate(preds, PREDICTIONS, "predictions.jsonl")
    assert stats["prompts_over_budget"] == 0 and set(stats["latency_s_single_request"]) == {"musique", "ecommerce"}
    again, _ = evaluate_model(cfg, "teacher", str(model_dir), rows, tmp_path / "w")
    assert again == preds  # resumed from the shards: nothing regenerated, nothing duplicated
    other = [{**p, "model": "rft", "correct": 1} for p in preds]
    summary = summarise({"rft": other, "teacher": preds}, {"teacher": stats})
    assert list(summary["datasets"]["musique"]) == ["rft", "teacher"]  # the caller's (registry's) order
    m = summary["datasets"]["musique"]["teacher"]
    assert m["n"] == 6 and 0 < m["tokens_per_response"] <= 6 and m["decode_tflops_per_response"] > 0
    assert m["external_tokens_per_response"] == 0 and summary["datasets"]["ecommerce"]["rft"]["em"] is None
    claims = check_claims(summary, [Claim(model="rft", metric="correctness", vs="teacher", target=0.5),
                                    Claim(model="rft", metric="tokens_per_response", vs="teacher", kind="ratio",
                                          op="<=", target=0.5)], "musique")
    assert [c["holds"] for c in claims] == [1 - m["correctness"] >= 0.5, False]
    assert "| teacher |" in markdown(summary)


def test_decode_flops_convention():
    from steps.core.modeling import decode_flops, prefill_flops
    prof = {"n_active": 1000, "n_layer": 2, "d_attn": 8}
    # 3 tokens after a 4-token prompt: contexts 5, 6, 7 -> 3*2*1000 + 2*2*8*(5+6+7)
    assert decode_flops(prof, 4, 3) == 6000 + 32 * 18
    assert prefill_flops(prof, 2) == 2 * 1000 * 2 + 2 * 2 * 8 * 3


def test_summary_reports_each_hop_count_and_the_think_ratio():
    from steps.report import markdown, summarise

    def pred(i, hops, correct, completion):
        return {"model": "m", "dataset": "musique", "id": str(i), "hops": hops, "completion": completion,
                "correct": correct, "helpful": 0, "em": float(correct), "f1": float(correct),
                "completion_tokens": len(completion.split()), "external_tokens": 0, "decode_tflops": 0.0,
                "prefill_tflops": 0.0, "latency_s": 0.0, "extras": {}}
    rows = [pred(0, 1, 1, "<think> </think> a"), pred(1, 1, 0, "<think> x y </think> b"),
            pred(2, 3, 1, "<think> x y z </think> c"), pred(3, 3, 1, "<think> x </think> d")]
    s = summarise({"m": rows}, {})["datasets"]["musique"]["m"]
    assert s["think_ratio"] == 0.75  # three of four responses think (an empty block does not count)
    assert s["by_hops"]["1"] == {"correctness": 0.5, "helpfulness": 0.0, "em": 0.5, "tokens_per_response": 4.0,
                                 "think_ratio": 0.5, "n": 2}
    assert s["by_hops"]["3"]["correctness"] == 1.0 and s["by_hops"]["3"]["think_ratio"] == 1.0
    assert "#### musique by hop count" in markdown({"datasets": {"musique": {"m": s}}})
    # one hop count only (e-commerce): no per-hop block
    assert summarise({"m": rows[:2]}, {})["datasets"]["musique"]["m"]["by_hops"] == {}


def test_rule_judge_musique_helpfulness_by_hop_count():
    from steps.core import synth
    from steps.ingest import parse_musique
    raw = synth.musique_rows(40, 3, {1: 1, 3: 1})
    ex, _ = parse_musique(list(enumerate(raw, 1)), "synthetic")
    one = next(e for e in ex if e["hops"] == 1)
    three = next(e for e in ex if e["hops"] == 3)

    def ch(e, response):
        v = RuleJudge().judge_one(e, response)
        return v.correct, v.helpful
    fact = one["documents"][one["helpful_doc_idxs"][0]]
    # 1 hop, no bridge: helpful when the response cites the supporting fact
    assert ch(one, f"the answer is {one['answers'][0]} . this is because {fact}") == (1, 1)
    assert ch(one, f"the answer is {one['answers'][0]} .") == (1, 0)
    # 3 hops: both bridge entities must appear; one is not enough
    b1, b2 = three["bridge"]
    assert ch(three, f"the answer is {three['answers'][0]} . this is because {b1} and {b2}") == (1, 1)
    assert ch(three, f"the answer is {three['answers'][0]} . this is because {b1}") == (1, 0)


def test_claims_are_checked_on_their_own_dataset():
    from steps.report import Claim, check_all
    summary = {"datasets": {"musique": {"a": {"correctness": 0.6}, "b": {"correctness": 0.5}},
                            "ecommerce": {"a": {"correctness": 0.4}, "b": {"correctness": 0.5}}}}
    claims = [Claim(model="a", metric="correctness", vs="b"),                       # musique: +0.1 holds
              Claim(model="a", metric="correctness", vs="b", dataset="ecommerce")]  # ecommerce: -0.1 fails
    out = check_all(summary, claims, "musique")
    assert [c["holds"] for c in out["musique"]] == [True] and [c["holds"] for c in out["ecommerce"]] == [False]
    assert out["ecommerce"][0]["value"] == -0.1
