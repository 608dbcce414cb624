"""Model card of a merged checkpoint: card data + Jinja template (templates/model_card.md.j2) -> README.md.

The front matter is built with huggingface_hub's `ModelCardData` (base model, `base_model_relation: merge`,
inherited licence, tags, calibration dataset, lm-eval results as `model-index`); the body says in plain words
what was done, shows original vs merged scores, the cluster map, how to reproduce and how to cite HC-SMoE.
Numbers only ever come from the inputs: when evaluation was skipped the card says so and shows no table.

    fields = inherit_license(source_dir, out_dir)  # copies LICENSE*, reads the base card's licence
    write_card(CardInputs(**fields, source_id=..., ...), out_dir)  # README.md (+ eval_comparison.png)
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hc_smoe_hub.card_format import bytes_text, count_text, duration_text, relative_change, table_cell
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.eval_table import acc_tasks, eval_rows, headline_row, write_eval_figure
from hc_smoe_hub.evaluation import PAPER_TASKS

log = logging.getLogger(__name__)


CARD_NAME = "README.md"
FIGURE_NAME = "eval_comparison.png"
TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_NAME = "model_card.md.j2"
ARXIV_URL = "https://arxiv.org/abs/2410.08589"
BASE_TAGS = ["moe", "mixture-of-experts", "expert-merging", "hc-smoe"]

# Author list and venue as on arXiv 2410.08589 and the official repository's citation (ICML 2025).
BIBTEX = """\
@inproceedings{chen2025hcsmoe,
  title         = {{Retraining-Free Merging of Sparse MoE via Hierarchical Clustering}},
  author        = {Chen, I-Chun and Liu, Hsu-Shen and Sun, Wei-Fang and Chao, Chen-Hao and
                   Hsu, Yen-Chang and Lee, Chun-Yi},
  booktitle     = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  year          = {2025},
  eprint        = {2410.08589},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
  url           = {https://arxiv.org/abs/2410.08589}
}"""

# How lm-eval 0.4.13 evaluates the paper's tasks (dataset_path, dataset_name, the split it scores), so the
# model-index points at the real Hub datasets; other tasks are named by their lm-eval task name.
TASK_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "boolq": ("aps/super_glue", "boolq", "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "mmlu": ("cais/mmlu", "all", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
    "rte": ("nyu-mll/glue", "rte", "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
}

# The calibration module's shorthand for the paper's C4 shard.
_DATASET_ALIASES = {"c4": "allenai/c4"}
_LOCAL_SUFFIXES = {".txt", ".json", ".jsonl", ".gz", ".parquet", ".csv"}
# Metrics shown first in the table, in this order; any other metric follows alphabetically.
_MODEL_INDEX_METRICS = ("acc", "acc_norm")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class CardInputs:
    """Everything the card states. Results are `evaluation.evaluate` dicts, None when eval was skipped."""

    source_id: str
    source_revision: str | None
    license: str | None
    license_file_copied: bool
    model_family: str  # config.model_type, e.g. "mixtral"
    method: str  # e.g. "hc-smoe"
    settings: dict[str, Any]  # every setting of the run: keep, linkage, metric, merge, router, calibration...
    experts_before: int
    experts_after: int
    top_k_before: int
    top_k_after: int
    params_before: int
    params_after: int
    disk_bytes_before: int
    disk_bytes_after: int
    # Per MoE layer, the original expert ids merged into each new expert; a dict keys them by decoder layer
    # index (models with dense layers), a list numbers MoE layers from 0.
    clusters: list[list[list[int]]] | dict[int, list[list[int]]]
    results_before: dict[str, dict[str, float]] | None
    results_after: dict[str, dict[str, float]] | None
    eval_settings: dict[str, Any] | None  # tasks, num_fewshot, limit (lm_eval_version when known)
    command: str
    tool_version: str
    hardware: str
    timings: dict[str, float]  # stage -> seconds
    repo_id: str
    calibration_dataset: str  # Hub dataset id, "c4", or a local file name
    created_at: str = field(default_factory=_now)
    method_description: str = ""  # plain words; generated from method + settings when empty
    license_name: str | None = None  # from the base card, used with license "other"
    license_link: str | None = None
    license_file_name: str = "LICENSE"  # name of the copied licence file in the output folder
    source_is_local: bool = False  # a local directory: no Hub link, no base_model in the front matter
    # Layout facts of the family (hc_smoe.json's "architecture"): MTP layers dropped, the model_type written.
    architecture: dict[str, Any] = field(default_factory=dict)


def architecture_notes(arch: Mapping[str, Any]) -> list[str]:
    """Card lines for what the output's layout changed beyond the experts (empty for most families)."""
    notes = []
    mtp = arch.get("mtp_layers")
    if mtp and mtp.get("action") == "dropped":
        keys = ", ".join(f"`{k}` = {v}" for k, v in (mtp.get("config") or {}).items())
        notes.append(f"**Multi-token-prediction layers:** the source's {mtp['count']} MTP layer(s) were dropped, "
                     f"not reduced ({keys} in config.json); speculative decoding with them is not available")
    if arch.get("written_as"):
        notes.append(f"**model_type:** written as `{arch['written_as']}`, the transformers class of this "
                     "architecture, so that stock transformers loads it without remote code")
    weights = arch.get("weights_format")
    if weights and weights.get("output") == "re-quantized":
        notes.append(f"**Quantized weights:** the source is {weights['source_format']}; the merged experts were "
                     "re-quantized with the same scheme and block size, every other tensor is copied unchanged and "
                     "`quantization_config` is kept")
    elif weights:
        notes.append(f"**Dequantized weights:** the source is {weights['source_format']}; this checkpoint is "
                     f"written dequantized in {weights['output_format']} and has no `quantization_config`")
    routing = arch.get("routing") or {}
    if routing.get("selection_bias"):
        notes.append("**Router selection bias:** each merged expert's `e_score_correction_bias` is reduced by the "
                     "rule of its router row (see `hc_smoe_hub/merging.py`, `router_bias`)")
    return notes


# ------------------------------------------------------------------------------------------------ formatting


def hub_dataset_id(name: str) -> str | None:
    """The Hub id of a calibration source, or None for a local file."""
    name = _DATASET_ALIASES.get(name, name)
    path = Path(name)
    if path.exists() or path.suffix.lower() in _LOCAL_SUFFIXES or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _cluster_rows(clusters: list[list[list[int]]] | dict[int, list[list[int]]]) -> list[tuple[int, str]]:
    items = sorted(clusters.items()) if isinstance(clusters, dict) else list(enumerate(clusters))
    return [(layer, " · ".join(f"{j} ← [{', '.join(str(e) for e in sorted(group))}]"
                               for j, group in enumerate(groups)))
            for layer, groups in items]


def _method_description(inputs: CardInputs) -> str:
    if inputs.method_description:
        return inputs.method_description
    from hc_smoe_hub.merging import MERGE_DESCRIPTIONS, ROUTER_DESCRIPTIONS
    from hc_smoe_hub.methods import METHOD_DESCRIPTIONS

    s = inputs.settings
    if inputs.method == "hc-smoe":
        linkage, metric = s.get("linkage", "average"), s.get("metric", "euclidean")
        grouping = (f"hierarchical clustering ({linkage} linkage, {metric} distance) of the experts' average "
                    "outputs on the calibration tokens")
    elif inputs.method in ("anchored", "anchored-o", "takeover"):
        grouping = METHOD_DESCRIPTIONS[inputs.method].split(": ", 1)[-1]
    else:
        known = METHOD_DESCRIPTIONS.get(inputs.method)
        return f"{known}." if known else f"the `{inputs.method}` expert reduction (every setting is listed below)."
    merge, router = s.get("merge", "freq"), s.get("router", "n/a")
    merge_text = MERGE_DESCRIPTIONS.get(merge, "")
    router_text = ROUTER_DESCRIPTIONS.get(router, "")
    calibration = ("each layer calibrated on the outputs of the already reduced layers before it"
                   if s.get("sequential") else "every layer calibrated on the original model's hidden states")
    return (f"{grouping}, then `{merge}` merging of each group into one expert"
            f"{' (' + merge_text + ')' if merge_text else ''}; router rows: `{router}`"
            f"{' (' + router_text + ')' if router_text else ''}; {calibration}.")


def _calibration(inputs: CardInputs) -> str:
    hub_id = hub_dataset_id(inputs.calibration_dataset)
    link = f"https://huggingface.co/datasets/{hub_id}"
    name = f"[{hub_id}]({link})" if hub_id else f"`{inputs.calibration_dataset}`"
    if inputs.calibration_dataset in _DATASET_ALIASES:
        name += " (the HC-SMoE paper's C4 shard)"
    s = inputs.settings
    if "num_samples" in s and "seq_len" in s:
        name += f", {s['num_samples']} sequences of {s['seq_len']} tokens"
    if "seed" in s:
        name += f" (seed {s['seed']})"
    return name


def _eval_description(eval_settings: Mapping[str, Any] | None) -> tuple[str, str | None]:
    if not eval_settings:
        return "(the evaluation settings were not recorded).", None
    shots = eval_settings.get("num_fewshot", eval_settings.get("fewshot", 0))
    parts = [f"{shots}-shot"]
    if eval_settings.get("lm_eval_version"):
        parts.append(f"lm-eval {eval_settings['lm_eval_version']}")
    limit = eval_settings.get("limit")
    parts.append(f"at most {limit} documents per task" if limit else "every document of each task")
    note = None
    if limit:
        note = (f"**Subset only:** each task was scored on at most {limit} documents (`--limit`), so these "
                "numbers are estimates and not comparable with full-set results such as the paper's.")
    return ", ".join(parts) + ".", note


def _source_link(inputs: CardInputs) -> str:
    if inputs.source_is_local:
        return f"`{inputs.source_id}` (a local checkpoint)"
    return f"[{inputs.source_id}](https://huggingface.co/{inputs.source_id})"


def _license_text(inputs: CardInputs) -> str:
    base = _source_link(inputs)
    if not inputs.license:
        return (f"The card of {base} states no licence. Check the base model's terms before using or sharing "
                "this model.")
    text = f"This model is derived from {base} and carries its licence, `{inputs.license}`"
    if inputs.license_name:
        text += f" ({inputs.license_name})"
    if inputs.license_file_copied:
        name = inputs.license_file_name
        text += f"; the base model's licence file is included as [{name}]({name})"
    elif inputs.license == "other":
        text += "; the base model ships no licence file, see its page for the terms"
    return text + "."


def _license_link(inputs: CardInputs) -> str | None:
    link = inputs.license_link
    if link and not re.match(r"^https?://", link) and not inputs.source_is_local:
        relative = link.removeprefix("./")
        if inputs.license_file_copied and relative == inputs.license_file_name:
            return relative
        # A relative link of the base card points into the base repository, where that file still is.
        return f"https://huggingface.co/{inputs.source_id}/blob/{inputs.source_revision or 'main'}/{relative}"
    if not link and inputs.license == "other" and inputs.license_file_copied:
        return inputs.license_file_name
    return link


# ------------------------------------------------------------------------------------------------- card data


def _tag(text: str) -> str:
    # Model types keep their underscores ("qwen2_moe"), as the Hub's own architecture tags do.
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")


def _eval_results(inputs: CardInputs) -> list[EvalResult]:
    """Merged-model acc / acc_norm per task, rounded to 4 decimals as shown in the body."""
    shots = (inputs.eval_settings or {}).get("num_fewshot", (inputs.eval_settings or {}).get("fewshot"))
    out = []
    for task, metrics in (inputs.results_after or {}).items():
        dataset, config, split = TASK_DATASETS.get(task, (task, None, None))
        for metric in _MODEL_INDEX_METRICS:
            value = metrics.get(metric)
            if value is None or not math.isfinite(value):
                continue
            out.append(EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=dataset,
                dataset_name=task,
                dataset_config=config,
                dataset_split=split,
                dataset_args={"num_few_shot": shots} if shots is not None else None,
                metric_type=metric,
                metric_name=f"{metric} ({shots}-shot)" if shots is not None else metric,
                metric_value=round(value, 4),
            ))
    return out


def _is_pruned(clusters: list[list[list[int]]] | dict[int, list[list[int]]]) -> bool:
    """Every new expert is one original expert: a pruning, where the unlisted experts were removed."""
    layers = clusters.values() if isinstance(clusters, dict) else clusters
    return all(len(group) == 1 for groups in layers for group in groups)


def card_data(inputs: CardInputs) -> ModelCardData:
    """The front matter: what the Hub indexes (base model relation, licence, tags, datasets, model-index)."""
    hub_id = hub_dataset_id(inputs.calibration_dataset)
    results = _eval_results(inputs)
    return ModelCardData(
        base_model=None if inputs.source_is_local else inputs.source_id,
        base_model_relation=None if inputs.source_is_local else "merge",
        license=inputs.license,
        license_name=inputs.license_name,
        license_link=_license_link(inputs),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*BASE_TAGS, _tag(inputs.model_family), _tag(inputs.method)],
        datasets=[hub_id] if hub_id else None,
        eval_results=results or None,
        model_name=inputs.repo_id.split("/")[-1],
    )


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a misspelt variable fails the render instead of vanishing
    )
    return env.get_template(TEMPLATE_NAME)


def render_card(inputs: CardInputs, with_figure: bool | None = None) -> str:
    """The README.md text. `with_figure` (default: whenever a task has acc) links eval_comparison.png."""
    before, after = inputs.results_before or None, inputs.results_after or None
    has_results = bool(before or after)
    if with_figure is None:
        with_figure = bool(acc_tasks(before, after))
    description, limit_note = _eval_description(inputs.eval_settings)
    timings = [(stage, duration_text(sec)) for stage, sec in inputs.timings.items()]
    tasks = (inputs.eval_settings or {}).get("tasks") or PAPER_TASKS
    text = _template().render(
        card_data=card_data(inputs).to_yaml(),
        model_name=inputs.repo_id.split("/")[-1],
        repo_id=inputs.repo_id,
        source_id=inputs.source_id,
        source_link=_source_link(inputs),
        source_revision=inputs.source_revision,
        model_family=inputs.model_family,
        arxiv_url=ARXIV_URL,
        method=inputs.method,
        is_hc_smoe=inputs.method == "hc-smoe",
        pruned=_is_pruned(inputs.clusters),
        method_description=_method_description(inputs),
        architecture_notes=architecture_notes(inputs.architecture),
        experts_before=inputs.experts_before,
        experts_after=inputs.experts_after,
        top_k_before=inputs.top_k_before,
        top_k_after=inputs.top_k_after,
        top_k_changed=inputs.top_k_after != inputs.top_k_before,
        params_before=count_text(inputs.params_before),
        params_after=count_text(inputs.params_after),
        params_change=relative_change(inputs.params_before, inputs.params_after),
        disk_before=bytes_text(inputs.disk_bytes_before),
        disk_after=bytes_text(inputs.disk_bytes_after),
        disk_change=relative_change(inputs.disk_bytes_before, inputs.disk_bytes_after),
        calibration=_calibration(inputs),
        settings=[(table_cell(k), f"`{table_cell(v)}`") for k, v in inputs.settings.items()],
        has_results=has_results,
        eval_description=description,
        limit_note=limit_note,
        eval_rows=eval_rows(before, after) if has_results else [],
        headline_row=headline_row(before, after) if has_results else None,
        figure=FIGURE_NAME if has_results and with_figure else None,
        suggested_tasks=",".join(tasks),
        clusters=_cluster_rows(inputs.clusters),
        command=inputs.command,
        tool_version=inputs.tool_version,
        hardware=inputs.hardware,
        created_at=inputs.created_at,
        timings=timings,
        total_time=duration_text(sum(inputs.timings.values())),
        license_text=_license_text(inputs),
        bibtex=BIBTEX,
    )
    ModelCard(text)  # parses the front matter back; raises on a card the Hub could not read
    return text


# ----------------------------------------------------------------------------------------------------- files


def write_card(inputs: CardInputs, out_dir: Path) -> Path:
    """Write README.md (and eval_comparison.png when a task reports acc) into `out_dir`; return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_figure = bool(acc_tasks(inputs.results_before or None, inputs.results_after or None))
    if with_figure:
        try:
            write_eval_figure(inputs.results_before, inputs.results_after, out_dir / FIGURE_NAME)
        except HcSmoeError as exc:
            # A card without the chart is still a complete card: the table carries the numbers.
            log.warning("No evaluation figure: %s", exc)
            with_figure = False
    readme = out_dir / CARD_NAME
    readme.write_text(render_card(inputs, with_figure=with_figure), encoding="utf-8")
    log.debug("Wrote the model card %s", readme)
    return readme
