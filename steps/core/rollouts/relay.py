"""relay: RelayLLM's token-level collaborative decoding (arXiv 2601.05167), and its random-call baseline.

The student (the policy) writes; when it writes a command `<call>n</call>` it pauses, the teacher
continues the same text for n tokens, and the student resumes after them:

    student:  ... the bridge entity is <call> 8 </call>
    teacher:  (sees "... the bridge entity is", every command removed) writes 8 tokens
    student:  resumes after the teacher's 8 tokens, its command still in its own context

Per response: the student's and the teacher's token counts, the calls, the ownership mask (the
teacher's tokens 0: they carry no loss in training, steps.core.rl) and the decode FLOPs of both
models (the convention of steps.core.modeling: each token costs 2·N_active + 2·n_layer·c·d_attn
at its context length c, the student's tokens at the student's context, the teacher's at the
teacher's own context of each call). All of it is in `RolloutCompletion.meta`, which evaluation
reports as extra columns: `calls`, `teacher_tokens`, `student_tokens`, `call_ratio` (teacher
tokens / all tokens of the response), `malformed_calls`, `calls_over_limit`, `failed`,
`student_decode_tflops`, `teacher_decode_tflops`, `total_decode_tflops`.

Decoding is batched in rounds: every unfinished sequence decodes until it ends, reaches its
budget or closes a command (per-row stopping, one `generate` for all of them); then every
sequence waiting on the teacher goes to the teacher in one call (in-process back ends: one batch
decoded to the largest n and each row cut to its own n, exact because the back ends sample each
row from its own seeded stream; an OpenAI-compatible server: one call per distinct n, its
requests concurrent, so that no server decodes tokens that are thrown away). Sampling
is seeded per (prompt, sample, segment), so a sequence's text does not depend on what shares
its batch; a student that never calls writes exactly what the plain rollout writes.

Rules (options of the factory, params `models.<row>.options` and `<stage>.protocol_options`):
- `teacher`: {backend, model, ...back-end options} (steps.core.backends: transformers in-process,
  vllm in-process, or openai: any OpenAI-compatible completions endpoint, with its retries);
  `teacher_temperature` (null: the rollout's own).
- The global budget is the rollout's `max_new_tokens`: student and teacher tokens together.
  n is capped by `max_call_tokens` and by the budget left. At most `max_calls` calls per
  response; a well-formed command beyond that stays text (counted in `calls_over_limit`) and the
  student goes on.
- Malformed commands — no number, n <= 0, an open `<call>` never closed, a stray `</call>` —
  stay text, are counted in `malformed_calls`, and never stop decoding.
- A teacher call that fails (the back end's retries exhausted, or any error) ends that response
  as failed: `failed` = 1, its text emptied (every judge scores it 0) and its mask all 0 (a
  response the environment broke teaches the policy nothing); the batch goes on without it.

Where we depart from the reference code (Chengsong-Huang/RelayLLM):
- The reference rolls the student's whole last segment back before appending the teacher's
  text, and gives the teacher the text up to the *first* command of the response; here the
  student's text stays (the command included: the policy must learn to write it) and the
  teacher sees the whole text so far with every command removed, as the paper describes.
- The reference ends the response when the teacher stops (end of text) and when a command
  comes after the last allowed call; here control returns to the student in both cases, so the
  end-of-sequence token is always the student's own (its loss is the student's) and a surplus
  command costs nothing but its tokens.
- The reference leaves the teacher's tokens in the student's loss (its mask line is commented
  out); here they are masked (ownership mask 0).

`relay_random` is the paper's comparison: the student model decodes without commands, and the
teacher is called for `call_tokens` tokens at `calls` random positions (uniform over the first
`position_range` student tokens, seeded per response); set them to spend the teacher budget
the RelayLLM row spends (its `teacher_tokens` column) to compare at the same budget.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from steps.core.backends import SamplingParams, derive_seed, make_backend
from steps.core.prompts import Prompt
from steps.core.rollouts import RolloutCompletion
from steps.core.rollouts.segments import generate_segments, single_token_id

log = logging.getLogger(__name__)

CALL_OPEN, CALL_CLOSE = "<call>", "</call>"
_COMMAND_AT_END = re.compile(r"<call>\s*([^<>]*?)\s*</call>\s*$")
_NUMERIC_COMMAND = re.compile(r"[ \t]*<call>\s*[-+]?\d*\s*</call>")
_TAG = re.compile(r"[ \t]*</?call>")


def strip_commands(text: str) -> str:
    """The text the teacher sees: every command removed (`<call>n</call>` whole, well-formed or
    with a bad number; any other `<call>` / `</call>` tag alone, its content kept)."""
    return _TAG.sub("", _NUMERIC_COMMAND.sub("", text))


def parse_close(segment: str) -> tuple[int | None, int]:
    """For a student segment that ends with `</call>`: (n of a well-formed call or None, number of
    malformed commands in the segment). Opens before the last one were never closed."""
    opens = segment.count(CALL_OPEN)
    m = _COMMAND_AT_END.search(segment)
    if m is None or opens == 0:
        return None, 1 + opens  # a stray close (and any open that had no close of its own)
    unclosed = opens - 1
    body = m.group(1)
    if not body.isdigit() or int(body) <= 0:
        return None, 1 + unclosed
    return int(body), unclosed


def count_unterminated(segment: str) -> int:
    """Opens in a segment that ended without a close (end of text or budget)."""
    return segment.count(CALL_OPEN)


@dataclass
class _Row:
    prompt: Prompt
    j: int
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    segment: int = 0
    calls: int = 0
    malformed: int = 0
    over_limit: int = 0
    pending: int = 0                   # n of the call waiting for the teacher
    finish: str | None = None          # stop | length | failed
    teacher_flops: float = 0.0
    teacher_generated: int = 0         # in the teacher's own tokens
    forced: list[int] = field(default_factory=list)  # relay_random: student-token positions of the calls

    @property
    def student_tokens(self) -> int:
        return sum(self.mask)


_TEACHERS: dict[str, Any] = {}


def teacher_backend(spec: dict[str, Any]) -> Any:
    """The teacher's back end, built once per spec per process (an RL stage builds a rollout per
    step; the teacher must not be reloaded each time)."""
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _TEACHERS:
        spec = dict(spec)
        _TEACHERS[key] = make_backend(spec.pop("backend", "transformers"), **spec)
    return _TEACHERS[key]


def release_teacher(spec: dict[str, Any]) -> None:
    backend = _TEACHERS.pop(json.dumps(spec, sort_keys=True, default=str), None)
    if backend is not None:
        backend.close()


def _profile_of(backend: Any) -> dict[str, int] | None:
    """The FLOPs profile of an in-process back end's model (None for a server)."""
    from pathlib import Path

    from steps.core import modeling

    model = getattr(backend, "model", None)
    if model is None or not hasattr(model, "named_parameters"):
        return None
    path = Path(str(getattr(backend, "model_name", "")))
    if (path / "flops_profile.json").exists():
        return modeling.load_profile(path)
    return modeling.flops_profile(model)


def _context_flops(profile: dict[str, int], contexts: Sequence[int]) -> float:
    """Decode FLOPs of tokens generated at the given context lengths."""
    n, layers, d = profile["n_active"], profile["n_layer"], profile["d_attn"]
    return float(sum(2.0 * n + 2.0 * layers * c * d for c in contexts))


class RelayRollout:
    def __init__(self, backend: Any, teacher: dict[str, Any] | None = None, max_calls: int = 3,
                 max_call_tokens: int = 64, teacher_temperature: float | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, teacher_backend_obj: Any = None,
                 random_calls: dict[str, Any] | None = None):
        if getattr(backend, "model", None) is None or getattr(backend, "tokenizer", None) is None:
            raise ValueError(f"the relay rollout decodes the student in-process: it needs the transformers back end, "
                             f"got {getattr(backend, 'name', backend)!r}")
        if teacher_backend_obj is None and not teacher:
            raise ValueError("the relay rollout needs a teacher: options.teacher = {backend, model, ...}")
        if max_calls < 0 or max_call_tokens < 1:
            raise ValueError(f"relay: max_calls must be >= 0 and max_call_tokens >= 1, got {max_calls}, {max_call_tokens}")
        self.backend = backend
        self.tokenizer, self.model = backend.tokenizer, backend.model
        self.teacher_spec = dict(teacher or {})
        self.teacher = teacher_backend_obj or teacher_backend(self.teacher_spec)
        if getattr(self.teacher, "use_chat", False):
            raise ValueError("relay: the teacher continues raw text, so an OpenAI-compatible teacher must use the "
                             "completions endpoint: set teacher.use_chat: false (and teacher.tokenizer to count tokens)")
        self.max_calls, self.max_call_tokens = max_calls, max_call_tokens
        self.teacher_temperature = teacher_temperature
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.random_calls = random_calls
        self._close_id = single_token_id(self.tokenizer, CALL_CLOSE)
        self._can_close = self._close_id is not None or not self._spells_unknown(CALL_CLOSE)
        self._shared_vocab = self._vocab_shared()
        self._student_profile = _profile_of(backend)
        self._teacher_profile = _profile_of(self.teacher)
        self.stats = {"calls": 0, "malformed_calls": 0, "calls_over_limit": 0, "failed": 0}

    # --- tokenizer facts ------------------------------------------------------------------------
    def _spells_unknown(self, text: str) -> bool:
        unk = self.tokenizer.unk_token_id
        return unk is not None and unk in self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _vocab_shared(self) -> bool:
        """The teacher's token ids mean the same tokens to the student (then they are inserted as
        they are; otherwise the teacher's text is tokenised by the student's tokenizer)."""
        ttok = getattr(self.teacher, "tokenizer", None)
        if ttok is None:
            return False
        svocab = self.tokenizer.get_vocab()
        return all(svocab.get(t) == i for t, i in ttok.get_vocab().items())

    # --- decoding -------------------------------------------------------------------------------
    def run(self, prompts: Sequence[Prompt], sampling: SamplingParams, on_batch=None) -> list[list[RolloutCompletion]]:
        """`sampling.n` relay completions per prompt, in chunks of the student back end's batch size
        (`on_batch` after each chunk, so that a caller can persist them)."""
        per_chunk = max(1, int(getattr(self.backend, "batch_size", 64) or 64) // sampling.n)
        results: list[list[RolloutCompletion]] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = self._run_chunk(prompts[start:start + per_chunk], sampling)
            results += chunk
            if on_batch:
                on_batch(list(range(start, start + len(chunk))), chunk)
        return results

    def _run_chunk(self, prompts: Sequence[Prompt], sampling: SamplingParams) -> list[list[RolloutCompletion]]:
        t0 = time.perf_counter()
        tok = self.tokenizer
        rows = [_Row(p, j, tok(p.text, add_special_tokens=False)["input_ids"])
                for p in prompts for j in range(sampling.n)]
        if self.random_calls is not None:
            self._draw_positions(rows, sampling)
        budget = sampling.max_new_tokens
        while any(r.finish is None for r in rows):
            writing = [r for r in rows if r.finish is None and not r.pending]
            if writing:
                self._student_step(writing, sampling, budget)
            waiting = [r for r in rows if r.finish is None and r.pending]
            if waiting:
                self._teacher_step(waiting, sampling, budget)
        elapsed = (time.perf_counter() - t0) / max(1, len(rows))
        outs = [self._completion(r, elapsed) for r in rows]
        return [outs[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]

    def _draw_positions(self, rows: list[_Row], sampling: SamplingParams) -> None:
        calls = int(self.random_calls.get("calls", 1))
        span = int(self.random_calls.get("position_range") or sampling.max_new_tokens)
        for r in rows:
            rng = random.Random(derive_seed(sampling.seed, r.prompt.key, r.j, "random-calls"))
            r.forced = sorted(rng.randrange(span) for _ in range(calls))

    def _student_step(self, rows: list[_Row], sampling: SamplingParams, budget: int) -> None:
        limits = []
        for r in rows:
            limit = budget - len(r.ids)
            if r.forced:
                limit = min(limit, r.forced[0] - r.student_tokens)
            limits.append(limit)
        # Segment 0 draws exactly as the plain back end does (same seed), later segments from their own stream.
        seeds = [derive_seed(sampling.seed, r.prompt.key, r.j) if r.segment == 0
                 else derive_seed(sampling.seed, r.prompt.key, r.j, "relay", r.segment) for r in rows]
        can_close = self._can_close and self.random_calls is None
        stop_ids = {self._close_id} if can_close and self._close_id is not None else set()
        stop_texts = (CALL_CLOSE,) if can_close and self._close_id is None else ()
        segments = generate_segments(self.backend, [r.prompt_ids + r.ids for r in rows], seeds, limits,
                                     sampling.temperature, sampling.top_p, stop_ids, stop_texts)
        tok = self.tokenizer
        for r, seg in zip(rows, segments, strict=True):
            r.segment += 1
            kept, ended, closed = seg.ids, seg.ended, seg.closed
            r.ids += kept
            r.mask += [1] * len(kept)
            text = tok.decode(kept, skip_special_tokens=True) if can_close else ""
            if closed:
                n, bad = parse_close(text)
                r.malformed += bad
                if n is not None and r.calls >= self.max_calls:
                    r.over_limit += 1
                elif n is not None:
                    r.pending = min(n, self.max_call_tokens, budget - len(r.ids))
            else:
                r.malformed += count_unterminated(text) if ended or len(r.ids) >= budget else 0
            if r.forced and not ended and r.student_tokens >= r.forced[0]:
                r.forced.pop(0)
                r.pending = min(int(self.random_calls.get("call_tokens", 8)), budget - len(r.ids))
            if ended:
                r.finish, r.pending = "stop", 0
            elif len(r.ids) >= budget:
                r.finish, r.pending = "length", 0
            elif r.pending <= 0:
                r.pending = 0

    def _teacher_prompt(self, r: _Row) -> Prompt:
        text = strip_commands(self.tokenizer.decode(r.ids, skip_special_tokens=True))
        sep = "" if not text or r.prompt.text.endswith((" ", "\n")) else " "
        return Prompt(messages=(), text=r.prompt.text + sep + text, key=f"{r.prompt.key}/{r.j}/call{r.calls}")

    def _teacher_step(self, rows: list[_Row], sampling: SamplingParams, budget: int) -> None:
        temperature = sampling.temperature if self.teacher_temperature is None else self.teacher_temperature
        prompts = [self._teacher_prompt(r) for r in rows]
        server = getattr(self.teacher, "name", "") == "openai"
        groups = {} if server else {max(r.pending for r in rows): list(range(len(rows)))}
        if server:
            for i, r in enumerate(rows):
                groups.setdefault(r.pending, []).append(i)
        for n, idx in groups.items():
            sp = SamplingParams(n=1, temperature=temperature, top_p=sampling.top_p, max_new_tokens=n,
                                seed=derive_seed(sampling.seed, "relay-teacher"))
            results: dict[int, Any] = {}
            try:
                outs = self.teacher.generate([prompts[i] for i in idx], sp)
                results = {i: o[0] for i, o in zip(idx, outs, strict=True)}
            except Exception as e:  # noqa: BLE001 - isolate the failing requests: one at a time
                log.warning("relay: a teacher call for %d sequences failed (%s); retrying them one by one", len(idx), e)
                for i in idx:
                    try:
                        results[i] = self.teacher.generate([prompts[i]], sp)[0][0]
                    except Exception as e1:  # noqa: BLE001 - a teacher call that finally fails fails its response
                        log.warning("relay: teacher call for %s failed, the response ends as failed: %s",
                                    prompts[i].key, e1)
                        results[i] = None
            for i in idx:
                self._insert(rows[i], results[i], budget)

    def _insert(self, r: _Row, c: Any, budget: int) -> None:
        n, r.pending = r.pending, 0
        if c is None:
            r.finish = "failed"
            return
        r.calls += 1
        teacher_ids = list(getattr(c, "token_ids", ()) or ())[:n]
        ttok = getattr(self.teacher, "tokenizer", None)
        if teacher_ids and self._shared_vocab:
            eos = {getattr(ttok, "eos_token_id", None), getattr(ttok, "pad_token_id", None)}
            ids = [t for t in teacher_ids if t not in eos]
        else:
            text = ttok.decode(teacher_ids, skip_special_tokens=True) if teacher_ids and ttok is not None else c.text
            if r.ids and not text.startswith((" ", "\n")):
                text = " " + text
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
        ids = ids[: max(0, budget - len(r.ids))]
        generated = len(teacher_ids) if teacher_ids else min(n, int(getattr(c, "completion_tokens", len(ids))))
        if self._teacher_profile is not None:
            p = int(getattr(c, "prompt_tokens", 0) or 0)
            r.teacher_flops += _context_flops(self._teacher_profile, [p + k + 1 for k in range(generated)])
        r.teacher_generated += generated
        r.ids += ids
        r.mask += [0] * len(ids)
        if len(r.ids) >= budget:
            r.finish = "length"

    def _completion(self, r: _Row, latency: float) -> RolloutCompletion:
        teacher = len(r.mask) - sum(r.mask)
        failed = r.finish == "failed"
        p = len(r.prompt_ids)
        meta: dict[str, Any] = {
            "calls": r.calls, "teacher_tokens": teacher, "student_tokens": sum(r.mask),
            "call_ratio": teacher / len(r.ids) if r.ids else 0.0, "malformed_calls": r.malformed,
            "calls_over_limit": r.over_limit, "failed": int(failed)}
        if self._student_profile is not None:
            student = _context_flops(self._student_profile, [p + k + 1 for k, m in enumerate(r.mask) if m])
            meta["student_decode_tflops"] = student / 1e12
            if self._teacher_profile is not None:
                meta["teacher_decode_tflops"] = r.teacher_flops / 1e12
                meta["total_decode_tflops"] = (student + r.teacher_flops) / 1e12
        for k in ("calls", "malformed_calls", "calls_over_limit", "failed"):
            self.stats[k] += meta[k]
        text = "" if failed else self.tokenizer.decode(r.ids, skip_special_tokens=True).strip()
        mask = (0,) * len(r.ids) if failed else tuple(r.mask)
        return RolloutCompletion(text=text, token_ids=tuple(r.ids), mask=mask, prompt_tokens=p,
                                 finish_reason=r.finish or "length", latency_s=latency, meta=meta)

    def close(self) -> None:
        self.backend.close()
        if self.teacher_spec:
            release_teacher(self.teacher_spec)


def _random(backend: Any, calls: int = 1, call_tokens: int = 8, position_range: int | None = None,
            **options: Any) -> RelayRollout:
    if calls < 0 or call_tokens < 1:
        raise ValueError(f"relay_random: calls must be >= 0 and call_tokens >= 1, got {calls}, {call_tokens}")
    return RelayRollout(backend, random_calls={"calls": calls, "call_tokens": call_tokens,
                                               "position_range": position_range}, **options)


PROTOCOLS = {
    "relay": lambda backend, **o: RelayRollout(backend, **o),
    "relay_random": _random,
}
