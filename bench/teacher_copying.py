"""Probe: does the embedded teacher copy names from the documents? Pretrains the teacher (or,
with --student, the student base) alone with params.yaml's settings and the overrides given,
and reports, every --eval-every steps, the share of entity tokens (people, cities, countries)
it predicts right when it reads a clean trace of a musique dev example ("tf"), and at the end
its greedy answers on --n-dev musique dev examples by answer kind and hop count. The README's
"How the teacher learnt to copy names" table was made with it.

    THREADS=1 .venv/bin/python -m bench.teacher_copying OUT --ingest data/ingest --steps 800 --batch 32

OUT gets log.json (one record per evaluation) and the model. Needs an ingest directory
(`dvc repro ingest`, or `python -m steps.ingest --params P --out DIR` for another split).
"""
import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
from steps import pretrain_demo as PD
from steps.core import modeling, prompts as P
from steps.core.config import load_config
from steps.core.schemas import EXAMPLES, read_validated
from steps.core.synth import COUNTRIES

ap = argparse.ArgumentParser()
ap.add_argument("out"); ap.add_argument("--ingest", default=str(ROOT / "data" / "ingest"))
ap.add_argument("--steps", type=int, default=400); ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--lr", type=float, default=3e-3); ap.add_argument("--arch-json", default="{}")
ap.add_argument("--eval-every", type=int, default=100); ap.add_argument("--pwrong", type=float, default=None)
ap.add_argument("--n-dev", type=int, default=150); ap.add_argument("--warmup", type=int, default=30)
ap.add_argument("--max-fillers", type=int, default=None); ap.add_argument("--student", action="store_true")
a = ap.parse_args()
out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
cfg = load_config(PD.PretrainDemoConfig, "pretrain_demo", str(ROOT / "params.yaml"))
arch = {**(cfg.student_arch if a.student else cfg.teacher_arch), **json.loads(a.arch_json)}
cfg = dataclasses.replace(cfg, batch_size=a.batch, learning_rate=a.lr, warmup_steps=a.warmup)
pw = (cfg.student_p_wrong if a.student else cfg.teacher_p_wrong) if a.pwrong is None else a.pwrong
pu = cfg.student_p_unhelpful if a.student else cfg.teacher_p_unhelpful
mf = cfg.max_fillers if a.max_fillers is None else a.max_fillers
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
train = read_validated(Path(a.ingest) / "train.jsonl", EXAMPLES)
dev = [e for e in read_validated(Path(a.ingest) / "dev.jsonl", EXAMPLES) if e["dataset"] == "musique"][: a.n_dev]
tok = modeling.build_tokenizer(PD.corpus_texts(train))
model = modeling.build_model(arch, len(tok), tok, cfg.seed)
print("params", sum(p.numel() for p in model.parameters()), "train", len(train), flush=True)
countries = set(COUNTRIES)
def kind(ans):
    return "country" if ans in countries else ("city" if len(ans) >= 6 else "person")

def tf_probe():
    """teacher-forced argmax accuracy on entity tokens of clean traces (no fillers, no wrong)."""
    model.eval()
    rng = random.Random(0)
    hits: dict[str, list[int]] = {}
    ents = set()
    for e in dev:
        ents.update(e["answers"]); ents.update(e["bridge"])
    with torch.no_grad():
        for e in dev:
            tr = PD.write_trace(e, rng, dev, 0.0, 1.0, 0)
            p = tok(P.render(e, tok).text, add_special_tokens=False)["input_ids"]
            c = tok(tr, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + c])
            pred = model(input_ids=ids).logits[0, :-1].argmax(-1)
            for j in range(len(p), len(p) + len(c)):
                w = tok.convert_ids_to_tokens(int(ids[0, j]))
                if w in ents or w in countries:
                    h = hits.setdefault(kind(w), [0, 0])
                    h[0] += int(pred[j - 1] == ids[0, j])
                    h[1] += 1
    model.train()
    return {k: round(100 * v[0] / v[1], 1) for k, v in hits.items()}

def greedy():
    model.eval()
    res: dict[str, list[int]] = {}
    tok.padding_side = "left"
    with torch.no_grad():
        for i in range(0, len(dev), 50):
            batch = dev[i:i + 50]
            texts = [P.render(e, tok).text for e in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=192, do_sample=False)
            for e, g in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
                text = tok.decode(g, skip_special_tokens=True)
                _, resp = P.split_completion(text)
                ans = e["answers"][0]
                ok = f"the answer is {ans} ." in resp
                for key in (f"{kind(ans)}/h{e['hops']}", kind(ans), "all"):
                    r = res.setdefault(key, [0, 0])
                    r[0] += ok
                    r[1] += 1
    model.train()
    return {k: f"{100*v[0]/v[1]:.1f}% of {v[1]}" for k, v in sorted(res.items())}

t0 = time.time()
log = []


def probe(step: int, loss: float) -> None:
    if step % a.eval_every and step != a.steps:
        return
    rec = {"step": step, "loss": round(loss, 3), "s": round(time.time() - t0), "tf": tf_probe()}
    if step == a.steps:
        rec["greedy"] = greedy()
    print(json.dumps(rec), flush=True)
    log.append(rec)
    (out / "log.json").write_text(json.dumps(log, indent=1))


PD.train_lm(model, tok, train, a.steps, cfg, pw, pu, mf, cfg.seed + 100, "probe", on_step=probe)
model.save_pretrained(out / "model")
tok.save_pretrained(out / "model")
