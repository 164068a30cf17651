"""The embedded default's pretraining loop: length-sorted micro-batches give the gradient of one
padded batch (less padding computed, nothing else changed)."""
import pytest
import torch

from steps.pretrain_demo import batch_step
from tests.helpers import TINY_DENSE, TINY_MOE, examples, tiny_model


@pytest.mark.parametrize("arch", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_micro_batches_give_the_loss_and_gradient_of_one_padded_batch(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path = tiny_model(tmp_path / "m", arch, examples())
    g = torch.Generator().manual_seed(0)
    # (prompt length, ids): lengths 5..40, so the parts pad to very different widths
    seqs = [(3, torch.randint(5, 40, (n,), generator=g).tolist()) for n in (5, 40, 12, 33, 7, 21)]

    def grads(micro: int) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path)
        loss = batch_step(model, seqs, 0, micro)
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one, g1 = grads(1)
    three, g3 = grads(3)
    # Dense: identical. MoE: the load-balancing term is nonlinear in the batch, so each part's is
    # weighted by its share (what gradient accumulation does in any trainer): close, not equal.
    tol = 1e-5 if arch is TINY_DENSE else 1e-3
    assert three == pytest.approx(one, rel=tol)
    flat1, flat3 = torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g3])
    if arch is TINY_DENSE:
        assert torch.allclose(flat1, flat3, atol=1e-6)
    else:
        assert torch.nn.functional.cosine_similarity(flat1, flat3, dim=0) > 0.99
    # and the single part is the transformers loss with labels (completion tokens only)
    model = AutoModelForCausalLM.from_pretrained(path)
    width = max(len(s) for _, s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for b, (p, s) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        labels[b, p:len(s)] = torch.tensor(s[p:])
    assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(one, rel=1e-4)
    if arch is TINY_DENSE:  # and sorting into parts pays off: less padding than one batch
        assert sum(max(len(s) for _, s in part) * len(part) for part in (sorted(seqs, key=lambda x: len(x[1]))[:3],
                   sorted(seqs, key=lambda x: len(x[1]))[3:])) < width * len(seqs)


def test_teacher_traces_never_repeat_a_filler_and_keep_their_order():
    """Fillers drawn with replacement taught greedy decoding to loop on them; each appears at most
    once, in FILLERS order, so a filler run always moves forward and ends."""
    import random

    from steps.core import synth
    from steps.ingest import parse_musique
    from steps.pretrain_demo import FILLERS, write_trace

    ex, _ = parse_musique(list(enumerate(synth.musique_rows(60, 0, {1: 1, 4: 1}), 1)), "synthetic")
    rng = random.Random(0)
    counts = set()
    for e in ex:
        think = write_trace(e, rng, ex, 0.0, 0.0, 6)
        found = [i for i, f in enumerate(FILLERS) if f in think]
        positions = [think.index(FILLERS[i]) for i in found]
        assert positions == sorted(positions) and all(think.count(FILLERS[i]) == 1 for i in found)
        counts.add(len(found))
    assert {0, 6} <= counts or len(counts) >= 5  # the verbosity still varies from none to many


def test_training_both_models_at_once_changes_nothing_but_the_time(tmp_path):
    """`workers: 2` trains the teacher and the student base in two processes; each model's weights
    depend on its own seed only, so they are byte-identical to training one after the other."""
    import hashlib

    from steps.pretrain_demo import PretrainDemoConfig, pretrain

    cfg = PretrainDemoConfig(teacher_arch=TINY_DENSE, student_arch=TINY_MOE, teacher_steps=3, student_steps=2,
                             batch_size=4, threads=1)
    rows = examples(8, 4)

    def digests(workers: int) -> dict[str, str]:
        out = tmp_path / f"w{workers}"
        metrics = pretrain(PretrainDemoConfig(**{**cfg.__dict__, "workers": workers}), rows, out)
        assert {"teacher_final_loss", "student_base_final_loss"} <= metrics.keys()
        return {m: hashlib.sha256((out / m / "model.safetensors").read_bytes()).hexdigest()
                for m in ("teacher", "student_base")}

    assert digests(2) == digests(1)


def test_a_killed_stage_leaves_no_training_worker(tmp_path):
    """SIGKILL the pretrain_demo stage while its two workers train: they end within seconds
    instead of training on and writing into the outputs of the stage's next run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    data = tmp_path / "ingest"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples(8, 4)))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"base": {"seed": 0}, "pretrain_demo": {
        "teacher_arch": TINY_DENSE, "student_arch": TINY_MOE, "teacher_steps": 100000, "student_steps": 100000,
        "batch_size": 4, "workers": 2, "threads": 1}}))
    stage = subprocess.Popen([sys.executable, "-m", "steps.pretrain_demo", "--params", str(params), "--data", str(data),
                              "--out", str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers: list[psutil.Process] = []
        while time.time() < deadline and len(workers) < 2:
            # the spawn start method adds a resource tracker beside the two workers
            workers = [c for c in psutil.Process(stage.pid).children()
                       if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.5)
        assert len(workers) == 2, "the stage never started its two training workers"
        time.sleep(3)  # the workers are training now
        assert all(w.is_running() for w in workers)
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers still running after the stage was killed: {[w.pid for w in alive]}"
    finally:  # only this test's processes: others of the session (image builds) go on
        stage.kill()
        for w in workers:
            if w.is_running():
                w.kill()
