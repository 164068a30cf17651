"""The ablation report's core on tiny synthetic run copies, and the variants file's checks."""
import json
import math
import subprocess

import pytest

from steps.ablations import (Variant, build_report, load_variants, markdown, pareto_front, plan_runs, read_run,
                             references, seed_keys, write_report)
from steps.core.registry import load_registry

REGISTRY = load_registry(params={"models": {
    "teacher": {"stage": "pretrain_demo", "path": "t", "fixed": True},
    "student_base": {"stage": "pretrain_demo", "path": "s", "fixed": True},
    "rft": {"stage": "rft", "path": "r"}, "rft_grpo": {"stage": "grpo", "path": "g"}}})
REFS, KEYS = references(REGISTRY), seed_keys(REGISTRY)
from steps.core.io import InputError
from tests.helpers import GIT

MODELS = ("teacher", "student_base", "rft", "rft_grpo")


def row(correct, tokens):
    return {"correctness": correct, "helpfulness": correct / 2, "em": correct, "f1": correct, "tokens_per_response": tokens,
            "decode_tflops_per_response": tokens * 1e-9, "n": 4}


def write_run(root, name, seed, overrides, settings, musique, log=None):
    """A run copy: `musique` maps model -> (correctness, tokens); e-commerce mirrors it without EM/F1."""
    d = root / name
    d.mkdir(parents=True)
    ecommerce = {m: {**row(*v), "em": None, "f1": None} for m, v in musique.items()}
    (d / "summary.json").write_text(json.dumps({"datasets": {"ecommerce": ecommerce,
                                                             "musique": {m: row(*v) for m, v in musique.items()}}}))
    (d / "run.json").write_text(json.dumps({"name": name, "seed": seed, "overrides": overrides, "settings": settings}))
    if log:
        (d / "train_log.csv").write_text(log)
    return d


BASE = {"teacher": (0.6, 100.0), "student_base": (0.1, 130.0)}
LOG = "step,reward,rewards/length/mean,completions/mean_length,kl\n1,1.0,0.2,80,\n5,1.5,0.6,50,\n"
SEEDS = ("rft.seed", "grpo.seed")


@pytest.fixture
def runs_dir(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "default-s0", 0, {}, {}, {**BASE, "rft": (0.4, 90.0), "rft_grpo": (0.38, 40.0)}, LOG)
    write_run(runs, "default-s1", 1, {}, {k: 1 for k in SEEDS}, {**BASE, "rft": (0.6, 70.0), "rft_grpo": (0.42, 44.0)}, LOG)
    write_run(runs, "beta-s0", 0, {"grpo.beta": 0.1}, {"grpo.beta": 0.1},
              {**BASE, "rft": (0.4, 90.0), "rft_grpo": (0.3, 60.0)}, LOG.replace("80,\n", "80,0.01\n"))
    return runs


VARIANTS = [Variant("rft_only", "rft", {}, (0, 1)), Variant("rft_grpo", "rft_grpo", {}, (0, 1)),
            Variant("beta", "rft_grpo", {"grpo.beta": 0.1}, (0,)), Variant("unrun", "rft", {"judge.keep": "all"}, (0,))]


def test_pareto_front_keeps_what_nothing_beats():
    points = {"short_bad": (5, 0.1), "a": (10, 0.5), "dominated": (20, 0.4), "tie_longer": (12, 0.5), "long_best": (30, 0.6)}
    assert pareto_front(points) == ["short_bad", "a", "long_best"]
    assert pareto_front({}) == []


def test_seed_mean_std_min_max_and_references(runs_dir):
    report = build_report(VARIANTS, [read_run(d) for d in sorted(runs_dir.iterdir())], REFS)
    rft = report["variants"]["rft_only"]
    assert rft["n_seeds"] == 2 and rft["seeds"] == [0, 1] and rft["runs"] == ["default-s0", "default-s1"]
    c = rft["datasets"]["musique"]["correctness"]
    assert c["mean"] == pytest.approx(0.5) and c["std"] == pytest.approx(math.sqrt(0.02))
    assert (c["min"], c["max"]) == (0.4, 0.6)
    beta = report["variants"]["beta"]["datasets"]["musique"]
    assert beta["tokens_per_response"] == {"mean": 60.0, "std": None, "min": 60.0, "max": 60.0}
    assert report["variants"]["beta"]["overrides"] == {"grpo.beta": 0.1}
    assert report["variants"]["rft_grpo"]["datasets"]["ecommerce"]["em"]["mean"] is None
    assert report["references"]["teacher"]["runs"] == ["default-s0"]
    assert report["datasets"] == ["musique", "ecommerce"]
    assert report["missing"] == {"unrun": [0]} and "unrun" not in report["variants"]
    # rft_only (80 tokens, 0.5) is beaten by nothing shorter; beta (60, 0.3) by rft_grpo (42, 0.4).
    assert report["pareto_front"]["musique"] == ["rft_grpo", "rft_only"]
    md = markdown(report)
    assert md.index("## musique") < md.index("## ecommerce") and "| rft_only | rft | 2 | 50.0 ± 14.1 |" in md


def test_missing_field_names_file_and_field(runs_dir):
    summary = runs_dir / "beta-s0" / "summary.json"
    data = json.loads(summary.read_text())
    del data["datasets"]["musique"]["rft_grpo"]["decode_tflops_per_response"]
    summary.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"beta-s0/summary.json: datasets.musique.rft_grpo: missing field "
                                         r"'decode_tflops_per_response'"):
        build_report(VARIANTS, [read_run(d) for d in sorted(runs_dir.iterdir())], REFS)
    (runs_dir / "default-s1" / "run.json").write_text('{"name": "x"}')
    with pytest.raises(InputError, match=r"default-s1/run.json: missing field 'seed'"):
        read_run(runs_dir / "default-s1")


def test_report_files_and_plots(runs_dir, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "reports"
    write_report(VARIANTS, runs_dir, out, REFS)
    assert json.loads((out / "ablations.json").read_text())["variants"]["rft_grpo"]["n_seeds"] == 2
    for png in ("ablations_pareto.png", "grpo_curves.png"):
        img = imread(out / "plots" / png)
        assert img.shape[0] > 300 and img.shape[1] > 300 and img.std() > 0.01


def test_the_pareto_plot_marks_every_fixed_row(runs_dir, tmp_path):
    """The methods report has fixed rows besides the teacher and the student base (route_teacher,
    route_student_base): each gets a marker of its own (a KeyError once ended `make compare`)."""
    import copy

    from matplotlib.image import imread
    from steps.ablations import plot_pareto

    report = build_report(VARIANTS, [read_run(d) for d in sorted(runs_dir.iterdir())], REFS)
    for name in ("route_teacher", "route_student_base"):
        report["references"][name] = copy.deepcopy(report["references"]["teacher"])
    plot_pareto(report, tmp_path / "pareto.png")
    assert imread(tmp_path / "pareto.png").std() > 0.01


def test_plan_shares_runs_and_seeds_only_what_differs():
    runs = plan_runs(VARIANTS, base_seed=0, keys=KEYS)
    assert [r.name for r in runs] == ["default-s0", "default-s1", "beta-s0", "unrun-s0"]
    assert runs[0].settings == {} and runs[1].settings == {"rft.seed": 1, "grpo.seed": 1}
    assert plan_runs(VARIANTS[:1], base_seed=5, keys=KEYS)[0].settings == {"rft.seed": 0, "grpo.seed": 0}


def test_a_run_evaluates_the_main_job_and_its_variants_rows_only():
    """An ablation of the main job must not retrain the sibling methods (adaptthink, relay, ...):
    each run names its evaluate@ targets; a sibling variant adds its row and what it is compared to."""
    from flows.ablations import dvc_command
    from steps.core.registry import load_registry

    rows = load_registry(params={"models": {
        "teacher": {"stage": "pretrain_demo", "path": "t", "fixed": True},
        "student_base": {"stage": "pretrain_demo", "path": "s", "fixed": True, "compare_to": "teacher"},
        "rft": {"stage": "rft", "path": "r", "compare_to": "student_base", "seeds": [0, 1]},
        "rft_grpo": {"stage": "grpo", "path": "g", "compare_to": "rft", "seeds": [0, 1]},
        "side": {"stage": "side", "path": "x", "compare_to": "rft", "main": False, "seeds": [0, 1]},
        "side_baseline": {"stage": "side_b", "path": "y", "compare_to": "rft", "main": False},
        "side_variant": {"stage": "side_v", "path": "z", "compare_to": "side_baseline", "main": False},
    }})
    main = ("teacher", "student_base", "rft", "rft_grpo")
    runs = plan_runs([Variant("rft_grpo", "rft_grpo", {}, (0, 1)), Variant("side", "side", {}, (1,)),
                      Variant("sv", "side_variant", {"side_v.k": 2}, (0,))], 0, KEYS, rows)
    assert [(r.name, r.rows) for r in runs] == [
        ("default-s0", main), ("default-s1", (*main, "side")),  # side's seed 1 shares the default run
        ("sv-s0", (*main, "side_baseline", "side_variant"))]   # the chain of compare_to rows
    assert dvc_command(runs[1])[-5:] == [f"evaluate@{r}" for r in (*main, "side")]
    assert "report" not in dvc_command(runs[1])
    assert plan_runs([Variant("x", "side", {}, (0,))], 0, KEYS)[0].rows == ()  # no registry: every row


def test_a_copy_made_from_another_baseline_is_run_again(tmp_path, monkeypatch):
    """A copied run is skipped only if its settings, its rows and its baseline (params.yaml,
    dvc.yaml, dvc.lock, steps/) match: new defaults or new code make every copy stale. While a
    killed flow's snapshot waits, the baseline is read from it (the live params hold overrides)."""
    from flows.ablations import SNAPSHOT, baseline_digest, is_copied

    monkeypatch.chdir(tmp_path)
    for f, text in {"params.yaml": "rft: {lr: 1}\n", "dvc.yaml": "stages: {}\n", "dvc.lock": "schema: '2.0'\n",
                    "steps/rft.py": "X = 1\n"}.items():
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text(text)
    base = baseline_digest()
    [run] = plan_runs(VARIANTS[:1], base_seed=0, keys=KEYS)[:1]
    (tmp_path / "runs" / run.name).mkdir(parents=True)
    (tmp_path / "runs" / run.name / "run.json").write_text(json.dumps(
        {"seed": run.seed, "overrides": run.overrides, "settings": run.settings, "rows": list(run.rows), "baseline": base}))
    assert is_copied(run, tmp_path / "runs", base)
    assert not is_copied(run, tmp_path / "runs", None)  # a copy from before baselines were recorded
    for f in ("params.yaml", "dvc.yaml", "dvc.lock", "steps/rft.py"):  # each one alone makes the copy stale
        original = (tmp_path / f).read_text()
        (tmp_path / f).write_text(original + "# changed\n")
        assert baseline_digest() != base and not is_copied(run, tmp_path / "runs", baseline_digest()), f
        (tmp_path / f).write_text(original)
    assert baseline_digest() == base
    # a killed flow left its snapshot and an override in params.yaml: the snapshot's copy counts
    (tmp_path / SNAPSHOT).mkdir(parents=True)
    (tmp_path / SNAPSHOT / "params.yaml").write_text((tmp_path / "params.yaml").read_text())
    (tmp_path / SNAPSHOT / "manifest.json").write_text("{}")
    (tmp_path / "params.yaml").write_text("rft: {lr: 2}\n")
    assert baseline_digest() == base


def test_compare_evaluates_every_fixed_row_in_every_run():
    """make compare's plan: every trained row at its seeds, and every fixed row, also one that no
    row is compared to (the report lists them all as references)."""
    from flows.compare import plan
    from steps.core.registry import load_registry

    rows = load_registry(params={"models": {
        "teacher": {"stage": "pretrain_demo", "path": "t", "fixed": True},
        "student_base": {"stage": "pretrain_demo", "path": "s", "fixed": True, "compare_to": "teacher"},
        "rft": {"stage": "rft", "path": "r", "compare_to": "student_base", "seeds": [0, 1]},
        "rft_grpo": {"stage": "grpo", "path": "g", "compare_to": "rft", "seeds": [0, 1]},
        "alone": {"stage": "pretrain_demo", "path": "s", "fixed": True, "compare_to": "teacher", "main": False},
        "side": {"stage": "side", "path": "x", "compare_to": "rft", "main": False, "seeds": [0, 1]},
    }})
    runs = plan(rows, 0)
    assert [r.name for r in runs] == ["default-s0", "default-s1"]
    assert all(r.rows == ("teacher", "student_base", "rft", "rft_grpo", "alone", "side") for r in runs)


def test_variants_file_errors_name_the_variant_and_field(tmp_path):
    p = tmp_path / "ablations.yaml"
    params = {"grpo": {"beta": 0.0}, "judge": {"keep": "all"}}
    p.write_text("variants:\n  a: {model: rft, overrides: {grpo.beta: 0.1}, seeds: [0, 1]}\n")
    assert load_variants(p, params, rows=REGISTRY) == [Variant("a", "rft", {"grpo.beta": 0.1}, (0, 1))]
    for text, message in [("b: {model: grpo}", r"variant 'b': field 'model' must be a trained row"),
                          ("c: {model: rft, overrides: {grpo.betta: 0.1}}", r"variant 'c': override 'grpo.betta' is not"),
                          ("d: {model: rft, seeds: []}", r"variant 'd': field 'seeds'"),
                          ("e: {model: rft, overrides: {rft.seed: 3}}", r"variant 'e': override 'rft.seed' is set by"),
                          ("f: {model: rft, runs: 2}", r"variant 'f': unknown key")]:
        p.write_text(f"variants:\n  {text}\n")
        with pytest.raises(InputError, match=message):
            load_variants(p, params, rows=REGISTRY)


def test_repository_variants_file_matches_params():
    from steps.core.config import load_params
    variants = {v.name: v for v in load_variants("ablations.yaml", load_params("params.yaml"))}
    # Both rows come from the same runs, and the report needs at least two seeds for them.
    assert variants["rft_only"].seeds == variants["rft_grpo"].seeds and len(variants["rft_grpo"].seeds) >= 2
    assert variants["grpo_only"].overrides == {"grpo.init": "student_base"}


def _git(cwd, *args):
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_a_killed_dvc_exp_run_leaves_head_detached_and_the_flow_reattaches_it(tmp_path, monkeypatch):
    from flows.ablations import reattach_branch

    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "a").write_text("a")
    _git(tmp_path, "add", "a")
    _git(tmp_path, "commit", "-qm", "a")
    monkeypatch.chdir(tmp_path)
    manifest = {"git_branch": "main", "git_head": _git(tmp_path, "rev-parse", "HEAD")}
    _git(tmp_path, "checkout", "-q", "--detach")  # what dvc exp run does for the length of a run
    assert reattach_branch(manifest) is None
    assert _git(tmp_path, "symbolic-ref", "--short", "HEAD") == "main"
    assert reattach_branch(manifest) is None  # on the branch: nothing to do

    # The branch moved since the flow started: leave HEAD alone and say so.
    _git(tmp_path, "checkout", "-q", "--detach")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "b")
    _git(tmp_path, "branch", "-f", "main", "HEAD")
    _git(tmp_path, "checkout", "-q", "--detach", "HEAD~1")
    warning = reattach_branch(manifest)
    assert warning and "'main'" in warning
    assert subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=tmp_path).returncode == 1


def test_the_methods_report_plots_calls_per_member_over_training(tmp_path):
    """reports/plots/methods_calls.png: each run copy's RL logs with call columns (a router's per
    member, a relay's ratio), a line per run; none with such columns: no plot, and an old one goes."""
    from matplotlib.image import imread

    from steps.methods import call_curves, plot_calls

    runs = tmp_path / "runs"
    for seed in (0, 1):
        d = runs / f"default-s{seed}"
        d.mkdir(parents=True)
        (d / "router_alpha_0_train_log.csv").write_text(
            "step,reward,rollout/calls,rollout/calls_teacher,rollout/cost\n1,0.1,0.5,0.25,0.3\n5,0.2,0.1,0.0,0.1\n")
        (d / "grpo_train_log.csv").write_text("step,reward\n1,0.1\n")  # no call columns: no panel
    curves = call_curves(runs)
    assert sorted(curves) == ["router_alpha_0: calls", "router_alpha_0: calls_teacher", "router_alpha_0: reward"]
    assert curves["router_alpha_0: calls_teacher"]["default-s1"] == [(1.0, 0.25), (5.0, 0.0)]
    png = tmp_path / "plots" / "methods_calls.png"
    assert plot_calls(runs, png) and imread(png).shape[1] > 1000
    for d in runs.iterdir():
        (d / "router_alpha_0_train_log.csv").unlink()
    assert not plot_calls(runs, png) and not png.exists()


def test_the_methods_report_plots_correctness_against_cost_for_the_rows_with_a_cost(tmp_path):
    """reports/plots/methods_cost.png: only rows that report `extras/cost` (routed rows; fixed rows
    with one seed have no std), the front from cheapest to most often right; none: no plot."""
    from matplotlib.image import imread

    from steps.methods import cost_points, plot_cost

    def row(correct, cost=None, std=None):
        m = {"correctness": {"mean": correct, "std": std}}
        if cost is not None:
            m["extras/cost"] = {"mean": cost, "std": std}
        return {"datasets": {"musique": m}}

    report = {"datasets": ["musique"],
              "references": {"teacher": row(0.6), "route_teacher": row(0.6, 0.1)},
              "variants": {"rft": row(0.5), "router_r1": row(0.4, 0.0, 0.02), "route_random": row(0.5, 0.05, 0.01),
                           "route_dear": row(0.45, 0.2, 0.0)}}
    pts = cost_points(report, "musique")
    assert list(pts) == ["route_teacher", "router_r1", "route_random", "route_dear"]  # fixed rows first
    assert pts["router_r1"] == pytest.approx((0.0, 40.0, 0.02, 2.0)) and pts["route_teacher"][2:] == (0.0, 0.0)
    png = tmp_path / "methods_cost.png"
    assert plot_cost(report, png) and imread(png).shape[0] > 400
    for r in (*report["references"].values(), *report["variants"].values()):
        r["datasets"]["musique"].pop("extras/cost", None)
    assert not plot_cost(report, png) and not png.exists()


def test_the_methods_report_plots_the_think_ratio_over_training(tmp_path):
    """reports/plots/methods_thinking.png: AdaCoT's own decisions as logged (rollout/thinks);
    AdaptThink's rollouts are forced half and half, so its think ratio is 1 - the policy's
    p(NoThinking), overall and per hop count; logs without those columns: no panel."""
    from matplotlib.image import imread

    from steps.methods import plot_thinking, think_curves

    runs = tmp_path / "runs"
    d = runs / "default-s0"
    d.mkdir(parents=True)
    (d / "adacot_train_log.csv").write_text("step,reward,rollout/thinks\n1,0.1,1.0\n5,0.2,0.75\n")
    (d / "adaptthink_train_log.csv").write_text(
        "step,reward,rollout/forced_nothinking,rollout/p_nothinking,rollout/p_nothinking_hops_1\n"
        "1,-0.2,0.5,0.25,0.5\n5,-0.1,0.5,0.125,\n")  # a step without a 1-hop prompt leaves the cell empty
    (d / "relay_train_log.csv").write_text("step,reward,rollout/calls\n1,0.1,0.5\n")
    curves = think_curves(runs)
    assert sorted(curves) == ["adacot: reward", "adacot: think ratio", "adaptthink: p(NoThinking) (log)",
                              "adaptthink: reward", "adaptthink: think ratio", "adaptthink: think ratio, 1-hop"]
    assert curves["adaptthink: p(NoThinking) (log)"]["default-s0"] == [(1.0, 0.25), (5.0, 0.125)]
    assert curves["adacot: think ratio"]["default-s0"] == [(1.0, 1.0), (5.0, 0.75)]
    assert curves["adaptthink: think ratio"]["default-s0"] == [(1.0, 0.75), (5.0, 0.875)]
    assert curves["adaptthink: think ratio, 1-hop"]["default-s0"] == [(1.0, 0.5)]
    png = tmp_path / "methods_thinking.png"
    assert plot_thinking(runs, png) and imread(png).shape[1] > 1000
    (d / "adacot_train_log.csv").unlink()
    (d / "adaptthink_train_log.csv").unlink()
    assert not plot_thinking(runs, png) and not png.exists()


def test_the_methods_report_has_think_ratio_and_correctness_per_hop_count(runs_dir, tmp_path):
    """The summaries' by_hops reach methods.json as hops_<h>/think_ratio and hops_<h>/correctness
    (mean over seeds) and methods.md's table per hop count; a dataset without hops gets none."""
    from steps.methods import hops_markdown

    for run, ratio in (("default-s0", 0.5), ("default-s1", 1.0)):
        path = runs_dir / run / "summary.json"
        summary = json.loads(path.read_text())
        for m in summary["datasets"]["musique"].values():
            m["think_ratio"] = ratio
            m["by_hops"] = {"1": {"correctness": 0.2, "think_ratio": ratio, "n": 2},
                            "3": {"correctness": 0.6, "think_ratio": 1.0, "n": 2}}
        path.write_text(json.dumps(summary))
    report = build_report(VARIANTS[:2], [read_run(runs_dir / r) for r in ("default-s0", "default-s1")], REFS)
    m = report["variants"]["rft_grpo"]["datasets"]["musique"]
    assert m["hops_1/think_ratio"]["mean"] == pytest.approx(0.75) and m["hops_3/correctness"]["mean"] == 0.6
    assert "hops_1/think_ratio" not in report["variants"]["rft_grpo"]["datasets"]["ecommerce"]
    md = hops_markdown(report)
    assert "## musique by hop count" in md and "## ecommerce" not in md
    assert "| rft_grpo | 75 ± 35 | 75 ± 35 | 100 ± 0 | 20 ± 0 | 60 ± 0 |" in md
