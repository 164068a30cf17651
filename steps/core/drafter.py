"""TLT's two learned pieces of speculative decoding: a drafter trained on the policy's own
features, online, and a bandit that picks the draft depth per running batch size.

    state = SpecState(SpecConfig(drafter="eagle", depth="bandit"), hidden_size=96)
    FastEngine(policy, eos_ids, pad_id, spec, state=state).generate(...)   # drafts, verifies, records
    state.after_rollout(policy)                                             # between RL steps

**The drafter** (EAGLE's idea, arXiv 2401.15077, as TLT uses it): the policy's top feature f_t
(the input of its output layer at the position that produced token x_{t+1}) and the embedding
of x_{t+1} predict the next feature f_{t+1}; the policy's own output layer turns a predicted
feature into a draft token, which is fed back for the next draft. The drafter reuses the live
policy's embedding and output layer (never trained here), so only a small block is learned. It
is trained on what the engine records while it decodes: every fed token and its feature, so
training costs no extra policy pass. Loss, as EAGLE's: smooth L1 between predicted and true
features plus 0.1 x the cross-entropy of the predicted feature's token distribution against
the true feature's.

Departures from the reference (fastrl's EAGLE layer), and why:
- the block is attention-free (a fused projection of [f_t; e(x_{t+1})] and one residual MLP)
  where EAGLE's is a full decoder layer attending over the drafted prefix. Drafts here are at
  most a handful of tokens past a feature that already encodes the whole context, and on CPU a
  drafter pass must cost a small fraction of a policy pass for speculation to pay at all;
- "online" means a few optimiser steps on a buffer of the latest rollouts between RL steps, on
  the same device, counted in the step time; TLT trains on GPUs left idle by the rollout tail.
  `frozen` is the same drafter trained once (on the first data it sees, or on `warm_start`'s)
  and never again: the peer that shows what following the policy is worth.

**The bandit**: bucketed epsilon-greedy, as the reference's. Buckets are powers of two of the
running batch size; arms are draft depths 0..draft_tokens, 0 being a plain step (no drafting),
so the bandit can also learn that speculation does not pay at a batch size. Reward: tokens
emitted per second of the pass (drafting included), averaged over each arm's last pulls; the
reference scores accepted tokens x batch size / step time, which gives a plain step no score to
compare against. An eagle drafter that has never been trained does not draft (it would propose
noise, and the bandit would learn from it that speculation does not pay): its first rollout only
records features. Its reward is a measured time, so the depths it picks, and with them which draws a
row's tokens come from, follow the machine's timing: every output is distributed as the policy's,
but a run is not bit-reproducible (two GRPO runs of one seed trained two models; README, TLT). A
fixed `draft_tokens` (`depth: fixed`) has no such input.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any


def _torch() -> Any:
    import torch
    return torch


def make_block(hidden_size: int, mult: int = 2) -> Any:
    """The learned part: [f; e] -> f' (a projection, one residual MLP, an RMS norm like the
    policy's final one, since the features are taken after it)."""
    torch = _torch()
    nn = torch.nn

    class DraftBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fuse = nn.Linear(2 * hidden_size, hidden_size)
            self.norm = nn.RMSNorm(hidden_size)
            self.up = nn.Linear(hidden_size, mult * hidden_size)
            self.down = nn.Linear(mult * hidden_size, hidden_size)
            self.out_norm = nn.RMSNorm(hidden_size)

        def forward(self, feat: Any, emb: Any) -> Any:
            h = self.fuse(torch.cat([feat, emb], -1))
            h = h + self.down(torch.nn.functional.silu(self.up(self.norm(h))))
            return self.out_norm(h)

    return DraftBlock()


class Drafter:
    """The draft block, its buffer of (f_t, x_{t+1}, f_{t+1}) triples and its optimiser."""

    def __init__(self, hidden_size: int, lr: float = 3e-3, buffer_tokens: int = 50_000, batch_size: int = 512,
                 seed: int = 0):
        torch = _torch()
        # Its own seed without moving the caller's RNG stream; never inference tensors, even when
        # built inside an inference_mode block (they could not train).
        with torch.random.fork_rng(), torch.inference_mode(False):
            torch.manual_seed(seed)
            self.block = make_block(hidden_size)
        self.opt = torch.optim.AdamW(self.block.parameters(), lr=lr, weight_decay=0.0)
        self.buffer_tokens, self.batch_size = buffer_tokens, batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.feat_in = self.tok_in = self.feat_out = None  # the buffer, newest last
        self.trained_steps = 0
        self._compiled: Any = None  # _draft through torch.compile, built on first use

    # -- drafting ---------------------------------------------------------------------------------

    def propose(self, policy: Any, feat: Any, tok: Any, k: int, compiled: bool = False) -> Any:
        """(b, k) greedy draft tokens after each row's pending token `tok` (b,), from the
        feature `feat` (b, d) of the position that produced it. `compiled`: each draft through
        `torch.compile` (the engine's `compile: true`): on a CPU a draft is a dozen tiny kernels,
        mostly framework work, as the policy's pass is."""
        torch = _torch()
        embed_w = policy.get_input_embeddings().weight
        head = policy.get_output_embeddings()
        out = []
        # Moved once, not per call: Module.to walks every parameter, which costs more than a draft.
        if self.block.fuse.weight.device != feat.device:
            self.block.to(feat.device)
        if compiled and self._compiled is None:
            self._compiled = torch.compile(self._draft, dynamic=True)
        # One row drafts eagerly, as the engine's one-row pass runs (a size of 1 is a graph of its own).
        draft = self._compiled if compiled and feat.shape[0] > 1 else self._draft
        with torch.inference_mode():
            for _ in range(k):
                feat, tok = draft(feat, tok, embed_w, head)
                out.append(tok)
        return torch.stack(out, 1)

    def _draft(self, feat: Any, tok: Any, embed_w: Any, head: Any) -> tuple[Any, Any]:
        """One draft: (the predicted next feature, its greedy token)."""
        torch = _torch()
        w = self.block.fuse.weight.dtype
        feat = self.block(feat.to(w), torch.nn.functional.embedding(tok, embed_w).to(w))
        return feat, head(feat.to(head.weight.dtype)).argmax(-1)

    # -- learning ---------------------------------------------------------------------------------

    def record(self, rows: Sequence[tuple[Any, Any]]) -> int:
        """Add each row's (fed tokens (n,), their features (n, d)) to the buffer as training
        triples; returns how many were added. Cloned outside inference mode, so they can train."""
        torch = _torch()
        ins, toks, outs = [], [], []
        with torch.inference_mode(False):
            for tokens, feats in rows:
                if len(tokens) < 2:
                    continue
                f = feats.detach().float().cpu().clone()
                t = torch.as_tensor(tokens).detach().cpu().clone().long()
                ins.append(f[:-1]), toks.append(t[1:]), outs.append(f[1:])
            if not ins:
                return 0
            new = (torch.cat(ins), torch.cat(toks), torch.cat(outs))
            if self.feat_in is not None:
                new = tuple(torch.cat([old, n])[-self.buffer_tokens:]
                            for old, n in zip((self.feat_in, self.tok_in, self.feat_out), new))
            self.feat_in, self.tok_in, self.feat_out = (x[-self.buffer_tokens:] for x in new)
        return len(new[1])

    @property
    def buffered(self) -> int:
        return 0 if self.tok_in is None else len(self.tok_in)

    def fit(self, policy: Any, steps: int) -> dict[str, float]:
        """`steps` optimiser steps on random batches of the buffer, against the policy's
        current output layer and embedding (read, never trained). Returns the mean loss, the
        top-1 agreement of predicted and true features' tokens, and the seconds spent."""
        torch = _torch()
        F = torch.nn.functional
        t0 = time.perf_counter()
        if steps <= 0 or not self.buffered:
            return {"drafter/loss": math.nan, "drafter/top1": math.nan, "drafter/seconds": 0.0}
        with torch.inference_mode(False), torch.enable_grad():
            embed_w = policy.get_input_embeddings().weight.detach().float()
            dev = embed_w.device
            head_w = policy.get_output_embeddings().weight.detach().float()
            head_b = getattr(policy.get_output_embeddings(), "bias", None)
            head_b = None if head_b is None else head_b.detach().float()
            block = self.block.to(dev).train()
            losses, agree = [], []
            for _ in range(steps):
                idx = torch.randint(self.buffered, (min(self.batch_size, self.buffered),), generator=self.rng)
                f_in, x, f_out = self.feat_in[idx].to(dev), self.tok_in[idx].to(dev), self.feat_out[idx].to(dev)
                pred = block(f_in, F.embedding(x, embed_w))
                logits, target = F.linear(pred, head_w, head_b), F.linear(f_out, head_w, head_b)
                loss = (F.smooth_l1_loss(pred, f_out)
                        + 0.1 * F.cross_entropy(logits, target.softmax(-1)))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                losses.append(float(loss.detach()))
                agree.append(float((logits.argmax(-1) == target.argmax(-1)).float().mean()))
            block.eval()
        self.trained_steps += steps
        return {"drafter/loss": sum(losses) / len(losses), "drafter/top1": sum(agree) / len(agree),
                "drafter/seconds": time.perf_counter() - t0}


def rft_sequences(kept_path: str, examples_path: str, tokenizer: Any, limit: int,
                  chat_template_kwargs: dict[str, Any] | None = None,
                  exclude: frozenset[str] = frozenset()) -> list[list[int]]:
    """Token ids of prompt + completion for up to `limit` judge-kept candidates (RFT's training
    data) whose example id is not in `exclude`, each prompt rendered as every stage renders it."""
    from steps.core.io import read_jsonl
    from steps.core.prompts import render

    kept = [k for k in read_jsonl(kept_path) if k["id"] not in exclude][:limit]
    want = {k["id"] for k in kept}
    prompts = {e["id"]: render(e, tokenizer, chat_template_kwargs).text
               for e in read_jsonl(examples_path) if e["id"] in want}
    missing = sorted(want - set(prompts))
    if missing:
        raise ValueError(f"speculative.init_data {kept_path}: ids not in {examples_path}: {missing[:5]}")
    return [tokenizer(prompts[k["id"]] + k["completion"], add_special_tokens=False)["input_ids"] for k in kept]


@contextlib.contextmanager
def output_features(model: Any) -> Iterator[list[Any]]:
    """While open, each forward pass of `model` appends the input of its output layer — the
    top feature the drafter reads and predicts, (b, kept positions, d) — to the yielded list."""
    got: list[Any] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: got.append(args[0]))
    try:
        yield got
    finally:
        handle.remove()


def policy_features(policy: Any, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> list[tuple[Any, Any]]:
    """(tokens, features) of each token sequence under the policy, teacher-forced: what
    `warm_start` trains on (RFT's data, before any rollout)."""
    torch = _torch()
    rows = []
    dev = next(policy.parameters()).device
    with output_features(policy) as got, torch.inference_mode():
        for s in range(0, len(sequences), batch_size):
            chunk = [list(q) for q in sequences[s:s + batch_size]]
            width = max(len(q) for q in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, q in enumerate(chunk):
                ids[i, :len(q)], mask[i, :len(q)] = torch.tensor(q), 1
            policy(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=0)
            feats = got.pop()
            for i, q in enumerate(chunk):
                rows.append((torch.tensor(q), feats[i, :len(q)]))
    return rows

class DepthBandit:
    """Bucketed epsilon-greedy over draft depths 0..max_depth (0: a plain step): per bucket of
    the running batch size (powers of two), each arm is tried once, then the best mean reward
    (tokens emitted per second) over its last `window` pulls is taken, a random arm with
    probability epsilon. A window, not the mean of all pulls: the drafter keeps learning, so a
    depth that did not pay under the drafter of an hour ago may pay now."""

    def __init__(self, max_depth: int, epsilon: float = 0.1, seed: int = 0, window: int = 16):
        self.arms = list(range(max_depth + 1))
        self.epsilon, self.window = epsilon, window
        self.rng = random.Random(seed)
        self.rewards: dict[tuple[int, int], deque[float]] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, batch))))

    def value(self, bucket: int, arm: int) -> float:
        r = self.rewards[(bucket, arm)]
        return sum(r) / len(r)

    def choose(self, batch: int) -> int:
        b = self.bucket(batch)
        untried = [a for a in self.arms if (b, a) not in self.rewards]
        if untried:
            return untried[0]
        if self.rng.random() < self.epsilon:
            return self.rng.choice(self.arms)
        return max(self.arms, key=lambda a: (self.value(b, a), -a))

    def update(self, batch: int, depth: int, tokens: int, seconds: float) -> None:
        key = (self.bucket(batch), depth)
        self.rewards.setdefault(key, deque(maxlen=self.window)).append(tokens / max(seconds, 1e-9))

    @property
    def counts(self) -> dict[tuple[int, int], int]:
        return {k: len(v) for k, v in self.rewards.items()}

    def best(self) -> dict[int, int]:
        """Per bucket, the arm with the best windowed reward so far (for logs and the README)."""
        out: dict[int, int] = {}
        for b in sorted({b for b, _ in self.rewards}):
            out[b] = max((a for a in self.arms if (b, a) in self.rewards), key=lambda a: self.value(b, a))
        return out


class SpecState:
    """What outlives one `generate` call: the drafter (and its buffer) and the bandit. An RL
    stage keeps one for the whole run, so the drafter follows the policy and the bandit keeps
    what it learnt; a back end without one gets a fresh state per call."""

    def __init__(self, spec: Any, hidden_size: int | None = None, seed: int = 0):
        self.spec = spec
        self.drafter = (Drafter(hidden_size, lr=spec.drafter_lr, batch_size=spec.drafter_batch, seed=seed)
                        if spec.drafter == "eagle" and hidden_size else None)
        self.bandit = DepthBandit(spec.draft_tokens, spec.epsilon, seed) if spec.depth == "bandit" else None

    def after_rollout(self, policy: Any) -> dict[str, float]:
        """Between RL steps: a drafter never trained gets `init_steps` on the buffer (the first
        rollout's features); after that, online, `train_steps` more; frozen, none."""
        if self.drafter is None:
            return {}
        if self.drafter.trained_steps == 0:
            steps = self.spec.init_steps
        else:
            steps = self.spec.train_steps if self.spec.online else 0
        return self.drafter.fit(policy, steps)

    def warm_start(self, policy: Any, sequences: Sequence[Sequence[int]]) -> dict[str, float]:
        """Train the drafter once on the policy's features of `sequences` (e.g. RFT's kept
        traces), before the first rollout."""
        if self.drafter is None:
            return {}
        self.drafter.record(policy_features(policy, sequences))
        return self.drafter.fit(policy, self.spec.init_steps)
