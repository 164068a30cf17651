"""export: the winning student as a self-contained bundle, registered in the MLflow registry.

Input: the registry row named by `export.source` (params.yaml `models`; rft_grpo by default), its
evaluation (data/evaluate/<source>/stats.json: the content hash of the weights that were
evaluated, which must be the weights exported) and reports/summary.json. Output:
bundle/ with safetensors weights, tokenizer, generation config, a model card (README.md)
with the evaluation table and lineage, meta.json and checksums.json (sha256 per file); and
registry.json naming the registered model version: an MLflow model with the transformers
flavour (steps.core.tracking.register_bundle), which `mlflow.transformers.load_model`, `mlflow
models serve` and `make serve` (vLLM) load as `models:/<model_name>@champion`. Promotion between
versions (aliases) is a separate, gated step.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.core import serving
from steps.core.config import help_field, load_config
from steps.core.io import InputError, read_json, write_json
from steps.core.lineage import build_meta

BUNDLE_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "flops_profile.json")


@dataclass(frozen=True)
class ExportConfig:
    model_name: str = help_field("livethinking-student", "registered model name in the MLflow registry")
    source: str = help_field("rft_grpo", "which evaluated model to export (its row in summary.json)")
    register: bool = help_field(True, "register a new model version (an MLflow transformers model)")
    max_new_tokens: int = help_field(256, "the registered model's default generation length (mlflow.pyfunc, "
                                          "`mlflow models serve`); a request's params override it")
    s3_uri: str | None = help_field(None, "also upload the bundle with a sha256 manifest to "
                                          "<s3_uri>/<model_name>/v<version> (steps.core.storage)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_card(name: str, source: str, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    from steps.report import markdown

    rows = {"datasets": {ds: {m: s for m, s in ms.items()} for ds, ms in summary["datasets"].items()}}
    chain, node = [], meta
    while node:
        chain.append(f"- {node.get('stage', '?')}: commit `{node.get('git_commit')}`, config `{node.get('config_hash')}`, "
                     f"parent `{node.get('parent')}`")
        node = node.get("parent_meta")
    return "\n".join([
        f"# {name}", "",
        f"A student model exported from the `{source}` stage of the LiveThinking pipeline: "
        "rejection-sampling fine-tuning on judge-filtered teacher traces, then GRPO with a "
        "correctness + helpfulness + length reward.", "",
        "Completions have the form `<think> reasoning </think> response`; the response ends with "
        "`the answer is X .` for extractive questions.", "",
        "## Evaluation (eval split; the row to read is `" + source + "`)", "", markdown(rows),
        "Decode FLOPs per generated token: 2·N_active + 2·n_layer·context·d_attn (see flops_profile.json).", "",
        "## Lineage", "", *chain, ""])


def build_bundle(model_dir: Path, bundle: Path, card: str, meta: dict[str, Any]) -> dict[str, str]:
    if bundle.exists():
        shutil.rmtree(bundle)
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if not (model_dir / "model.safetensors").exists():
        raise InputError(f"{model_dir}: no model.safetensors to export")
    for name in BUNDLE_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    (tmp / "README.md").write_text(card)
    write_json(tmp / "meta.json", meta)
    checksums = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
    write_json(tmp / "checksums.json", checksums)
    tmp.rename(bundle)
    return checksums


def serving_example(bundle: Path) -> dict[str, Any]:
    """The registered model's input example: a pipeline-style chat turn and the prompt the
    bundle's own chat template renders from it (text-generation takes rendered prompts)."""
    from transformers import AutoTokenizer

    messages = serving.example_messages()
    prompt = AutoTokenizer.from_pretrained(bundle).apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)
    return {"messages": messages, "prompt": prompt}


def main(argv: list[str] | None = None) -> None:
    from steps.core import tracking

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--summary", default="reports/summary.json")
    ap.add_argument("--evaluations", default="data/evaluate", help="per-model evaluation outputs (weights digests)")
    ap.add_argument("--out", default="data/export")
    args = ap.parse_args(argv)
    cfg = load_config(ExportConfig, "export", args.params)
    summary = read_json(args.summary)
    metrics = {f"{ds}.{k}": v for ds, ms in summary["datasets"].items()
               for k, v in (ms.get(cfg.source) or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not metrics:
        raise InputError(f"{args.summary}: no evaluation of model {cfg.source!r}; have "
                         f"{sorted({m for ms in summary['datasets'].values() for m in ms})}")
    from steps.core.fingerprint import dir_digest
    from steps.core.registry import row as registry_row

    model_dir, out = Path(registry_row(cfg.source, args.params).path), Path(args.out)
    evaluated = read_json(Path(args.evaluations) / cfg.source / "stats.json").get("model_digest")
    if evaluated != dir_digest(model_dir):
        raise InputError(f"{model_dir}: its weights are not the ones evaluated in {args.evaluations}/{cfg.source} "
                         "(run `dvc repro` so that evaluation and export see the same model)")
    meta = build_meta("export", cfg, parent=str(model_dir), metrics=metrics, source=cfg.source)
    checksums = build_bundle(model_dir, out / "bundle", model_card(cfg.model_name, cfg.source, summary, meta), meta)
    registry: dict[str, Any] = {"model_name": cfg.model_name, "version": None, "run_id": None}
    if cfg.register:
        tags = {"source": cfg.source, "git_commit": meta["git_commit"], "sha256": checksums["model.safetensors"]}
        registry.update(tracking.register_bundle(cfg, out / "bundle", cfg.model_name,
                                                 {k.replace(".", "/"): v for k, v in metrics.items()}, tags,
                                                 example=serving_example(out / "bundle"),
                                                 max_new_tokens=cfg.max_new_tokens))
    if cfg.s3_uri:
        from steps.core import storage

        ref = f"v{registry['version']}" if registry["version"] else checksums["model.safetensors"][:12]
        registry["s3_uri"] = f"{cfg.s3_uri.rstrip('/')}/{cfg.model_name}/{ref}"
        storage.upload_dir(out / "bundle", registry["s3_uri"])
    write_json(out / "registry.json", registry)
    print(f"export: {out / 'bundle'} -> {registry}")


if __name__ == "__main__":
    main()
