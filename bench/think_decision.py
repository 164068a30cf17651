"""Does skipping the thinking pay here? The probe behind the README's hybrid-thinking diagnosis.

For each model, on up to `--n` musique prompts of each hop count of the split (dev by default):
- `p_nothink`: the policy's own probability of NoThinking, p(`</think>` right after `<think>`),
  one forward pass per prompt (temperature 1, as in training);
- `--samples` rollouts forced each way, as AdaptThink's two halves (steps/core/rollouts/hybrid.py:
  `</think>` or the thinking opener forced as the decision token), temperature 1: their accuracy
  (the AdaptThink reward's acc: the judge's correctness, 0 when the think format fails), their
  format failures and tokens;
- `gain`: AdaptThink's expected reward of NoThinking minus thinking on the same prompt,
  acc_NT - acc_T + delta (ref_accuracy cancels): where it is negative the constrained objective
  pays for thinking, and a policy trained on it should keep thinking there.

    .venv/bin/python bench/think_decision.py data/rft/model data/adaptthink/model --n 40 --samples 4

Needs the split file and the models (`dvc repro rft adaptthink` makes them).
"""
import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steps.adaptthink import AdaptThinkConfig, choose_opener  # noqa: E402
from steps.core.backends import SamplingParams, TransformersBackend  # noqa: E402
from steps.core.config import load_config  # noqa: E402
from steps.core.prompts import Prompt  # noqa: E402
from steps.core.rewards.hybrid import accuracy, format_ok  # noqa: E402
from steps.core.rollouts.hybrid import AdaptThinkRollout, marker_ids, opened_by_prompt  # noqa: E402
from steps.core.schemas import EXAMPLES, read_validated  # noqa: E402
from steps.core.training import prompt_rows  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("models", nargs="+", help="policy directories (thinking-format models)")
ap.add_argument("--params", default=str(ROOT / "params.yaml"))
ap.add_argument("--split", default=str(ROOT / "data/ingest/dev.jsonl"))
ap.add_argument("--n", type=int, default=40, help="musique prompts per hop count")
ap.add_argument("--samples", type=int, default=4, help="rollouts per prompt and half")
ap.add_argument("--seed", type=int, default=13)
a = ap.parse_args()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

cfg = load_config(AdaptThinkConfig, "adaptthink", a.params)
delta = float(cfg.rewards["adaptthink"].get("delta", 0.05))
by_hop: dict[int, list[dict]] = defaultdict(list)
for e in read_validated(a.split, EXAMPLES):
    if e["dataset"] == "musique" and e.get("hops") is not None and len(by_hop[e["hops"]]) < a.n:
        by_hop[e["hops"]].append(e)
examples = [e for h in sorted(by_hop) for e in by_hop[h]]
print(f"{Path(a.split).name}: musique, {', '.join(f'{len(v)} {h}-hop' for h, v in sorted(by_hop.items()))} prompts; "
      f"{a.samples} rollouts per half, temperature {cfg.temperature}, delta {delta}")
for model_dir in a.models:
    tok = AutoTokenizer.from_pretrained(model_dir)
    open_id, close_id = marker_ids(tok)
    rows = prompt_rows(examples, tok, cfg.chat_template_kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p_nothink = []
    with torch.no_grad():
        for r in rows:
            ids = tok(r["prompt"], add_special_tokens=False)["input_ids"] + \
                ([] if opened_by_prompt(r["prompt"]) else [open_id])
            logits = model(torch.tensor([ids])).logits[0, -1].float() / max(cfg.temperature, 1e-6)
            p_nothink.append(float(torch.softmax(logits, dim=-1)[close_id]))
    del model
    opener = choose_opener(cfg, model_dir, [r["prompt"] for r in rows])
    rollout = AdaptThinkRollout(TransformersBackend(model_dir, batch_size=256, threads=cfg.threads),
                                thinking_opener_id=opener, nothinking_ratio=0.5)
    k = 2 * a.samples  # the first half of a prompt's copies is forced to NoThinking
    prompts = [Prompt(messages=(), text=r["prompt"], key=f"{r['id']}/{j}") for r in rows for j in range(k)]
    outs = rollout.run(prompts, SamplingParams(n=1, temperature=cfg.temperature,
                                               max_new_tokens=cfg.max_completion_length, seed=a.seed))
    rollout.close()
    table: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(rows):
        comps = [cs[0] for cs in outs[i * k:(i + 1) * k]]
        texts = [c.text for c in comps]
        acc = accuracy(texts, {key: [v] * k for key, v in r.items()}, **{
            o: v for o, v in (cfg.rewards["adaptthink"] or {}).items() if o not in ("weight", "delta")})
        t = table[r["hops"]]
        t["p_nothink"].append(p_nothink[i])
        for half, forced in (("NT", True), ("T", False)):
            picked = [j for j, c in enumerate(comps) if c.meta["forced_nothinking"] == forced]
            t[f"acc_{half}"].append(statistics.fmean(acc[j] for j in picked))
            t[f"fmt_fail_{half}"].append(statistics.fmean(not format_ok(texts[j]) for j in picked))
            t[f"tokens_{half}"].append(statistics.fmean(len(comps[j].token_ids) for j in picked))
        t["gain"].append(t["acc_NT"][-1] - t["acc_T"][-1] + delta)
    print(f"\n{model_dir} (thinking opener {tok.convert_ids_to_tokens(opener)!r})")
    cols = ["p_nothink", "acc_T", "acc_NT", "fmt_fail_T", "fmt_fail_NT", "tokens_T", "tokens_NT", "gain"]
    print("hops  n    " + "  ".join(f"{c:>11}" for c in cols) + "  prompts with gain > 0")
    for h in sorted(table):
        t = table[h]
        pos = sum(g > 0 for g in t["gain"])
        print(f"{h:>4}  {len(t['gain']):<3}  " + "  ".join(f"{statistics.fmean(t[c]):>11.3f}" for c in cols)
              + f"  {pos}/{len(t['gain'])}")
