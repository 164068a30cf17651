"""Nothing stale (issue 11): a resume key covers everything a candidate depends on, and a sample
does not depend on the batch it was drawn in, for every back end that takes per-request seeds."""
from __future__ import annotations

import dataclasses
import shutil

import pytest

from steps.core import backends
from steps.core.backends import RowSampler, SamplingParams, TransformersBackend, make_backend
from steps.core.fingerprint import code_digest, dir_digest
from steps.core.io import read_jsonl, write_json, write_jsonl
from steps.core.prompts import Prompt, messages, render
from steps.sample import SampleConfig, generate, resume_key, sample
from tests.helpers import TINY_DENSE, examples, tiny_model


@pytest.fixture(scope="module")
def rows():
    return examples(8, 6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, rows):
    return tiny_model(tmp_path_factory.mktemp("t") / "teacher", TINY_DENSE, rows)


# --- batch independence ---------------------------------------------------------------------

def test_the_same_examples_sampled_with_max_examples_3_or_all_get_the_same_candidates(rows, teacher, tmp_path):
    """The issue's reproduction: 3 examples, k = 4, sampled alone (max_examples 3) and among all
    14; then one prompt per call with a batch of 4 rows. All three agree on all 12 candidates."""
    cfg = SampleConfig(k=4, temperature=1.0, max_new_tokens=12, shard_size=64, backend_options={"batch_size": 512})
    few, _ = sample(dataclasses.replace(cfg, max_examples=3), rows, str(teacher), tmp_path / "a")
    many, _ = sample(cfg, rows, str(teacher), tmp_path / "b")
    small = dataclasses.replace(cfg, shard_size=1, backend_options={"batch_size": 4})
    one_by_one, _ = sample(small, rows[:3], str(teacher), tmp_path / "c")
    assert len(few) == 12 and few == many[:12] == one_by_one
    assert len({r["completion"] for r in few}) > 6  # it does sample: the candidates differ


def test_transformers_backend_alone_and_in_a_batch_with_nucleus_sampling(rows, teacher):
    backend = make_backend("transformers", model=str(teacher), batch_size=64)
    prompts = [render(e, backend.tokenizer) for e in rows]
    sp = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=10, seed=5)
    alone = backend.generate(prompts[4:5], sp)[0]
    batch = backend.generate(prompts, sp)[4]
    assert [c.token_ids for c in alone] == [c.token_ids for c in batch]
    assert all(len(c.token_ids) == c.completion_tokens and c.text for c in alone)
    assert backend.generate(prompts[4:5], dataclasses.replace(sp, seed=6))[0] != alone  # the seed matters


def test_row_sampler_draws_from_softmax_at_temperature_and_respects_top_p():
    """The sampler that replaced transformers' multinomial: frequencies over 4,000 rows (4,000
    seeds) match softmax(logits / T), and nothing outside the nucleus is ever drawn."""
    import torch

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 4000
    scores = logits.repeat(n, 1)
    ids = torch.zeros(n, 3, dtype=torch.long)  # prompt length 3, first generated position
    picks = RowSampler(range(n), 0.7, 1.0, 3, "cpu")(ids, scores).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    expected = torch.softmax(logits / 0.7, -1).double()
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)
    nucleus = RowSampler(range(n), 1.0, 0.6, 3, "cpu")(ids, scores).argmax(-1)
    assert set(nucleus.tolist()) == {0, 1}  # p = .55, .20, ... : the first two reach 0.6
    masked = torch.tensor([float("-inf"), 3.0, float("-inf"), 3.0, float("-inf")]).repeat(n, 1)
    drawn = RowSampler(range(n), 1.0, 1.0, 3, "cpu")(ids, masked).argmax(-1)
    assert set(drawn.tolist()) == {1, 3}  # a masked token (a suppressed id, the end of the vocabulary) never
    # Row r's draw depends on its seed and the position only.
    a = RowSampler([7, 8], 1.0, 1.0, 3, "cpu").uniforms(5)
    b = RowSampler([9, 7], 1.0, 1.0, 3, "cpu").uniforms(5)
    assert a[0] == b[1] and a[0] != RowSampler([7], 1.0, 1.0, 3, "cpu").uniforms(6)[0]
    # (R, k) positions at once (speculative verification): the same numbers as k calls, both streams.
    rows = RowSampler([7, 8, 9], 1.0, 1.0, 3, "cpu")
    at = torch.tensor([4, 9, 0])
    for stream in (0, 1):
        wide = rows.uniforms(at.unsqueeze(1) + torch.arange(3), stream=stream)
        assert torch.equal(wide, torch.stack([rows.uniforms(at + j, stream=stream) for j in range(3)], 1))


def test_openai_backend_alone_and_in_a_batch(serve):
    from steps.core.backend_openai import OpenAIBackend

    server = serve()
    prompts = [Prompt(messages=tuple(messages(e)), text="", key=e["id"]) for e in examples(4, 2)]
    b = OpenAIBackend(model="fake", base_url=server.base_url, progress=False)
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=50, seed=2)
    alone = b.generate(prompts[2:3], sp)[0]
    assert [c.text for c in alone] == [c.text for c in b.generate(prompts, sp)[2]]
    assert len({c.text for c in alone}) == 3


# --- resume keys ----------------------------------------------------------------------------

class CrashingBackend(TransformersBackend):
    """The transformers back end, stopped (as a kill would) once `crash_after` batches were
    handed to the stage, so that the shards written so far stay behind."""
    crash_after: int | None = None

    def generate(self, prompts, sampling, on_batch=None):
        calls = []

        def hand_over(idx, comps):
            on_batch(idx, comps)
            calls.append(1)
            if self.crash_after is not None and len(calls) >= self.crash_after:
                raise KeyboardInterrupt("killed")
        return super().generate(prompts, sampling, hand_over)


def _stage_inputs(tmp_path, rows, teacher):
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_json(tmp_path / "models.json", {"teacher": str(teacher), "student_base": str(teacher)})
    return str(tmp_path / "train.jsonl"), str(tmp_path / "models.json")


def test_a_retrained_teacher_in_the_same_path_never_resumes_old_rows(rows, tmp_path, monkeypatch):
    """Kill sample half-way, retrain the teacher in place (same path, same config.json), run
    again: every row comes from the new weights, exactly as a fresh run makes them."""
    monkeypatch.setitem(backends.REGISTRY, "crashing", f"{__name__}:CrashingBackend")
    teacher = tiny_model(tmp_path / "teacher", TINY_DENSE, rows, seed=0)
    data, models = _stage_inputs(tmp_path, rows, teacher)
    cfg = SampleConfig(backend="crashing", k=2, temperature=1.0, max_new_tokens=8, shard_size=4,
                       backend_options={"batch_size": 8})
    monkeypatch.setattr(CrashingBackend, "crash_after", 1)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, data, models, tmp_path / "out")
    assert len(list((tmp_path / "out/.resume").rglob("part-*.jsonl"))) == 1
    config_json = (teacher / "config.json").read_bytes()
    shutil.rmtree(teacher)
    tiny_model(teacher, TINY_DENSE, rows, seed=1)  # retrained: new weights, the same config
    assert (teacher / "config.json").read_bytes() == config_json
    monkeypatch.setattr(CrashingBackend, "crash_after", None)
    generate(cfg, data, models, tmp_path / "out")
    generate(cfg, data, models, tmp_path / "fresh")
    resumed = read_jsonl(tmp_path / "out/candidates.jsonl")
    assert resumed == read_jsonl(tmp_path / "fresh/candidates.jsonl")


def test_resume_key_covers_weights_tokenizer_input_config_and_code(rows, teacher, tmp_path):
    data, _ = _stage_inputs(tmp_path, rows, teacher)
    cfg = SampleConfig()
    key = resume_key(cfg, str(teacher), data)
    copy = shutil.copytree(teacher, tmp_path / "elsewhere" / "teacher")
    (copy / "meta.json").write_text("{}")  # lineage only: changes nothing a sample depends on
    assert resume_key(cfg, str(teacher), data) == key
    assert dir_digest(copy) == dir_digest(teacher)
    copied = resume_key(cfg, str(copy), data)
    template = copy / "chat_template.jinja"
    template.write_text(template.read_text().replace("<assistant> ", "<assistant>  "))
    assert resume_key(cfg, str(copy), data) != copied
    assert resume_key(dataclasses.replace(cfg, temperature=0.5), str(teacher), data) != key
    write_jsonl(tmp_path / "train.jsonl", rows[:-1])
    assert resume_key(cfg, str(teacher), data) != key
    assert code_digest("steps.sample", "steps.core.backends") != code_digest("steps.sample", "steps.core.prompts")
    assert resume_key(cfg, "served-model", data) != resume_key(cfg, "other-served-model", data)


def test_transport_options_leave_the_resume_key_alone(rows, teacher, tmp_path):
    """A restart after a kill may point at other servers, raise the concurrency or the batch
    size: the rows already written stay valid. An option that changes a completion still
    starts afresh."""
    data, _ = _stage_inputs(tmp_path, rows, teacher)

    def key(backend: str, **options) -> str:
        return resume_key(SampleConfig(backend=backend, backend_options=options), "served-model", data)

    one = key("openai", base_url="http://a:8000/v1", concurrency=8)
    assert key("openai", base_url=["http://a:8000/v1", "http://b:8000/v1"], concurrency=64,
               all_down_timeout_s=30, cache_dir=str(tmp_path / "cache")) == one
    assert key("openai", base_url="http://a:8000/v1", extra_body={"top_k": 20}) != one  # changes the draws
    assert key("openai", base_url="http://a:8000/v1", use_chat=False) != one  # another endpoint, another prompt
    assert key("transformers", batch_size=8) == key("transformers", batch_size=512)
    assert key("transformers", engine="fast") != key("transformers")


def test_dir_digest_is_content_not_path(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "w.bin").write_bytes(b"\x00\x01" * 1000)
    (a / "sub" / "t.json").write_text("{}")
    b = shutil.copytree(a, tmp_path / "b")
    assert dir_digest(a) == dir_digest(b)
    (b / "w.bin").write_bytes(b"\x00\x01" * 999 + b"\x00\x02")
    assert dir_digest(a) != dir_digest(b)
    c = shutil.copytree(a, tmp_path / "c")
    (c / "sub" / "t.json").rename(c / "sub" / "u.json")
    assert dir_digest(a) != dir_digest(c)
    with pytest.raises(FileNotFoundError):
        dir_digest(tmp_path / "missing")
