"""Tests of hc_smoe_hub.card: the rendered README is checked field by field against its inputs, offline.

The Hub's own card check (`RepoCard.validate`) is a POST to /api/validate-yaml, so here the front matter is
parsed back with huggingface_hub and checked against what that endpoint enforces for models (YAML mapping,
valid base_model id and relation, model-index shape).
Run: pytest tests/test_card.py
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id

from hc_smoe_hub import card as card_mod
from hc_smoe_hub.card import (  # write_eval_figure lives in eval_table, re-exported by card
    ARXIV_URL,
    CardInputs,
    render_card,
    write_card,
    write_eval_figure,
)
from hc_smoe_hub.card_license import inherit_license, license_from_source

TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "rte", "winogrande"]
WITH_NORM = {"arc_challenge", "arc_easy", "hellaswag", "openbookqa"}
# Mixtral-8x7B original / HC-SMoE 8->6 scale numbers; made up for the test, all different per task.
ACC_BEFORE = [0.5674, 0.8401, 0.8505, 0.6497, 0.6769, 0.3540, 0.7112, 0.7648]
ACC_AFTER = [0.5205, 0.8089, 0.8367, 0.6170, 0.6034, 0.3280, 0.6643, 0.7356]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results(accs: list[float], ppl: float, stderr: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, acc in zip(TASKS, accs, strict=True):
        metrics = {"acc": acc, "acc_stderr": stderr}
        if task in WITH_NORM:
            metrics |= {"acc_norm": acc + 0.0213, "acc_norm_stderr": stderr + 0.001}
        out[task] = metrics
    out["wikitext"] = {"word_perplexity": ppl, "byte_perplexity": 1.4732, "bits_per_byte": 0.5590}
    return out


CLUSTERS = [[[0, 5], [1], [2, 7], [3], [4], [6]] if layer % 2 else [[0], [1, 3], [2], [4, 6], [5], [7]]
            for layer in range(32)]


@pytest.fixture
def inputs() -> CardInputs:
    return CardInputs(
        source_id="mistralai/Mixtral-8x7B-v0.1",
        source_revision="fc7ac94680e38d7348cfa806e51218e6273104b0",
        license="apache-2.0",
        license_file_copied=False,
        model_family="mixtral",
        method="hc-smoe",
        settings={"keep": 6, "linkage": "average", "metric": "euclidean", "merge": "freq", "router": "fit",
                  "calibration": "c4", "num_samples": 32, "seq_len": 2048, "seed": 42, "sequential": False},
        experts_before=8,
        experts_after=6,
        top_k_before=2,
        top_k_after=2,
        params_before=46_702_792_704,
        params_after=35_429_048_320,
        disk_bytes_before=93_405_585_408,
        disk_bytes_after=70_858_096_640,
        clusters=CLUSTERS,
        results_before=results(ACC_BEFORE, 5.2314, 0.0131),
        results_after=results(ACC_AFTER, 1_234_567.0, 0.0142),
        eval_settings={"tasks": [*TASKS, "wikitext"], "num_fewshot": 0, "limit": None,
                       "lm_eval_version": "0.4.13"},
        command="hc-smoe-push mistralai/Mixtral-8x7B-v0.1 --keep 6 --repo alice/Mixtral-8x7B-v0.1-hc-smoe-6e",
        tool_version="0.1.0",
        hardware="1x NVIDIA H100 80GB HBM3, 16 CPU cores, 128 GiB RAM",
        timings={"download": 812.4, "calibration": 95.2, "merge": 1460.0, "evaluation": 7300.0,
                 "upload": 640.0},
        repo_id="alice/Mixtral-8x7B-v0.1-hc-smoe-6e",
        calibration_dataset="c4",
        created_at="2025-06-01T12:00:00+00:00",
    )


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """The evaluation table as {(task, metric): [original, merged, change]}."""
    section = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("Task", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def number(cell: str) -> float:
    return float(cell.split(" ± ")[0])


def test_front_matter(inputs):
    text = render_card(inputs)
    assert text.startswith("---\n")
    data = ModelCard(text).data
    assert data.base_model == "mistralai/Mixtral-8x7B-v0.1"
    assert data.get("base_model_relation") == "merge"
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.datasets == ["allenai/c4"]  # "c4" is the calibration module's name for the paper's C4 shard
    assert set(data.tags) >= {"moe", "mixture-of-experts", "expert-merging", "hc-smoe", "mixtral"}
    assert len(data.tags) == len(set(data.tags))
    assert data.model_name == "Mixtral-8x7B-v0.1-hc-smoe-6e"

    # model-index: acc for every task, acc_norm where the task has it, values of the merged model.
    got = {(r.dataset_name, r.metric_type): r for r in data.eval_results}
    expected = {(t, m): v for t, ms in inputs.results_after.items() for m, v in ms.items()
                if m in ("acc", "acc_norm")}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].metric_value == round(value, 4)
        assert got[key].task_type == "text-generation"
        assert got[key].dataset_args == {"num_few_shot": 0}
    assert got[("arc_challenge", "acc")].dataset_type == "allenai/ai2_arc"
    assert got[("arc_challenge", "acc")].dataset_config == "ARC-Challenge"
    assert got[("mmlu", "acc")].dataset_type == "cais/mmlu"
    assert ("wikitext", "word_perplexity") not in got


def test_card_passes_local_validation(inputs):
    text = render_card(inputs)
    card = ModelCard(text)
    # Round trip: what huggingface_hub writes back parses to the same metadata and body.
    again = ModelCard(str(card))
    assert again.data.to_dict() == card.data.to_dict()
    assert again.text == card.text
    # The checks the Hub's validate-yaml applies to a model card, done here without the network.
    meta = yaml.safe_load(text.split("---\n")[1])
    assert isinstance(meta, dict)
    validate_repo_id(meta["base_model"])
    assert meta["base_model_relation"] in {"adapter", "merge", "quantized", "finetune"}
    assert all(isinstance(t, str) and t == t.lower() for t in meta["tags"])
    name, parsed = model_index_to_eval_results(meta["model-index"])
    assert name == "Mixtral-8x7B-v0.1-hc-smoe-6e" and len(parsed) == len(TASKS) + len(WITH_NORM)
    for result in meta["model-index"][0]["results"]:
        assert result["task"]["type"] and result["dataset"]["type"] and result["dataset"]["name"]
        assert all(isinstance(m["value"], float) and m["type"] for m in result["metrics"])


def test_body_paper_and_what_was_done(inputs):
    text = render_card(inputs)
    assert ARXIV_URL in text
    bib = text.split("```bibtex\n", 1)[1].split("```", 1)[0]
    assert bib.startswith("@inproceedings{")
    assert "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" in bib
    for author in ("Chen, I-Chun", "Liu, Hsu-Shen", "Sun, Wei-Fang", "Chao, Chen-Hao", "Hsu, Yen-Chang",
                   "Lee, Chun-Yi"):
        assert author in bib
    assert "2410.08589" in bib and "2025" in bib and "International Conference on Machine Learning" in bib
    assert bib.count("{") == bib.count("}")
    assert "8 routed experts were merged into 6" in text
    assert "**Experts per MoE layer:** 8 → 6" in text
    assert "**Experts active per token (top-k):** 2 → 2\n" in text
    assert "`hc-smoe`: hierarchical clustering (average linkage, euclidean distance)" in text
    assert "46.70B (46,702,792,704) → 35.43B (35,429,048,320) (-24.1%)" in text
    assert "93.41 GB → 70.86 GB (-24.1%)" in text
    assert "at revision `fc7ac94680e38d7348cfa806e51218e6273104b0`" in text
    assert "[allenai/c4](https://huggingface.co/datasets/allenai/c4)" in text
    assert "32 sequences of 2048 tokens (seed 42)" in text
    for key, value in inputs.settings.items():
        shown = "false" if value is False else str(value)
        assert f"| {key} | `{shown}` |" in text
    assert "apache-2.0" in text.split("## License", 1)[1]
    assert "0-shot, lm-eval 0.4.13, every document of each task." in text


def test_eval_table_numbers_and_deltas(inputs):
    text = render_card(inputs)
    rows = table_rows(text)
    before, after = inputs.results_before, inputs.results_after
    expected_keys = {(t, m) for t in before for m in before[t] if not m.endswith("_stderr")}
    assert set(rows) - {("**Mean** (8 tasks)", "acc")} == expected_keys
    for (task, metric), (orig, merged, change) in rows.items():
        if task.startswith("**Mean"):
            continue
        b, a = before[task][metric], after[task][metric]
        assert math.isclose(number(orig), b, rel_tol=1e-3, abs_tol=5e-5)
        assert math.isclose(number(merged), a, rel_tol=1e-3, abs_tol=5e-5)
        assert math.isclose(float(change), a - b, rel_tol=1e-3, abs_tol=5e-5)
        assert change[0] in "+-"
        if f"{metric}_stderr" in before[task]:
            assert orig.endswith(f" ± {before[task][metric + '_stderr']:.4f}")
    # Exact text of one row: 4 decimals, signed change.
    assert rows[("arc_easy", "acc")] == ["0.8401 ± 0.0131", "0.8089 ± 0.0142", "-0.0312"]
    # A huge perplexity is written in scientific notation, still parseable.
    assert rows[("wikitext", "word_perplexity")][1] == "1.235e+06"
    mean = rows[("**Mean** (8 tasks)", "acc")]
    mb, ma = sum(ACC_BEFORE) / 8, sum(ACC_AFTER) / 8
    assert mean == [f"{mb:.4f}", f"{ma:.4f}", f"{ma - mb:+.4f}"]
    assert "](eval_comparison.png)" in text


def test_cluster_map_command_snippet(inputs):
    text = render_card(inputs)
    section = text.split("## Cluster map", 1)[1].split("\n## ", 1)[0]
    details = section.split("<details>", 1)[1].split("</details>", 1)[0]
    for layer, groups in enumerate(CLUSTERS):
        row = " · ".join(f"{j} ← [{', '.join(map(str, g))}]" for j, g in enumerate(groups))
        assert f"| {layer} | {row} |" in details
    assert "| 1 | 0 ← [0, 5] · 1 ← [1] · 2 ← [2, 7] · 3 ← [3] · 4 ← [4] · 5 ← [6] |" in details
    assert f"```bash\n{inputs.command}\n```" in text
    assert 'AutoModelForCausalLM.from_pretrained("alice/Mixtral-8x7B-v0.1-hc-smoe-6e"' in text
    assert 'AutoTokenizer.from_pretrained("alice/Mixtral-8x7B-v0.1-hc-smoe-6e")' in text
    assert "hc-smoe-hub 0.1.0" in text and inputs.hardware in text
    assert "| merge | 24 min 20 s |" in text and "| evaluation | 2 h 01 min |" in text
    assert "| **total** | **2 h 51 min** |" in text


def test_cluster_map_keyed_by_decoder_layer(inputs):
    text = render_card(replace(inputs, clusters={1: [[0, 1], [2]], 3: [[2], [0, 1]]}))
    assert "| 1 | 0 ← [0, 1] · 1 ← [2] |" in text and "| 3 | 0 ← [2] · 1 ← [0, 1] |" in text


def test_skipped_eval_has_no_table_and_no_numbers(inputs, tmp_path):
    skipped = replace(inputs, results_before=None, results_after=None, eval_settings=None)
    readme = write_card(skipped, tmp_path)
    text = readme.read_text()
    assert "Evaluation was skipped" in text
    assert "| Task | Metric" not in text and "eval_comparison.png" not in text
    assert table_rows(text) == {}
    assert not re.search(r"\b0\.\d{4}\b", text)  # no score-like number anywhere
    assert "model-index" not in text
    assert ModelCard(text).data.eval_results is None
    assert not (tmp_path / "eval_comparison.png").exists()


def test_only_merged_results(inputs):
    text = render_card(replace(inputs, results_before=None))
    rows = table_rows(text)
    assert rows[("boolq", "acc")] == ["n/a", "0.8367 ± 0.0142", "n/a"]
    assert rows[("**Mean** (8 tasks)", "acc")][0] == "n/a"


def test_limit_and_top_k_notes(inputs):
    text = render_card(replace(inputs, eval_settings={"tasks": TASKS, "num_fewshot": 0, "limit": 100},
                               experts_after=1, top_k_after=1))
    assert "at most 100 documents" in text and "not comparable" in text
    assert "2 → 1 (lowered to the number of remaining experts)" in text


def test_write_card_png(inputs, tmp_path):
    readme = write_card(inputs, tmp_path / "out")
    assert readme == tmp_path / "out" / "README.md"
    png = (tmp_path / "out" / "eval_comparison.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    # IHDR is the first chunk: width and height of a real image.
    length, kind = struct.unpack(">I4s", png[8:16])
    width, height = struct.unpack(">II", png[16:24])
    assert kind == b"IHDR" and length == 13 and width > 300 and height > 200
    from matplotlib.image import imread

    assert imread(tmp_path / "out" / "eval_comparison.png").shape[:2] == (height, width)
    assert readme.read_text() == render_card(inputs)


def test_write_eval_figure_needs_acc(tmp_path):
    with pytest.raises(ValueError):
        write_eval_figure({"w": {"word_perplexity": 3.0}}, None, tmp_path / "x.png")
    write_eval_figure(None, {"a": {"acc": 0.5}}, tmp_path / "one_side.png")
    assert (tmp_path / "one_side.png").read_bytes()[:8] == PNG_MAGIC


def write_source(src: Path, front_matter: str | None, license_text: str | None) -> None:
    src.mkdir()
    if front_matter is not None:
        (src / "README.md").write_text(f"---\n{front_matter}---\n\n# Base model\n")
    if license_text is not None:
        (src / "LICENSE").write_text(license_text)


def test_license_other_copies_file(inputs, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    terms = "DEEPSEEK LICENSE AGREEMENT\nVersion 1.0\n"
    write_source(src, "license: other\nlicense_name: deepseek\nlicense_link: LICENSE\n", terms)
    assert license_from_source(src) == ("other", src / "LICENSE")
    fields = inherit_license(src, out)
    assert (out / "LICENSE").read_text() == terms
    assert fields == {"license": "other", "license_file_copied": True, "license_file_name": "LICENSE",
                      "license_name": "deepseek", "license_link": "LICENSE"}
    text = render_card(replace(inputs, **fields))
    data = ModelCard(text).data
    assert data.license == "other" and data.license_name == "deepseek" and data.license_link == "LICENSE"
    assert "[LICENSE](LICENSE)" in text.split("## License", 1)[1]


def test_license_other_without_link_points_at_copied_file(inputs, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_source(src, "license: other\n", None)
    (src / "LICENSE.txt").write_text("terms")
    fields = inherit_license(src, out)
    assert fields["license_file_name"] == "LICENSE.txt" and (out / "LICENSE.txt").read_text() == "terms"
    assert ModelCard(render_card(replace(inputs, **fields))).data.license_link == "LICENSE.txt"


def test_license_sources(tmp_path):
    write_source(tmp_path / "apache", "license: apache-2.0\ntags: [moe]\n", None)
    assert license_from_source(tmp_path / "apache") == ("apache-2.0", None)
    write_source(tmp_path / "bare", None, "MIT License\n")
    assert license_from_source(tmp_path / "bare") == (None, tmp_path / "bare" / "LICENSE")
    write_source(tmp_path / "broken", "license: [unclosed\n", None)
    assert license_from_source(tmp_path / "broken") == (None, None)


def test_unknown_licence_and_relative_link(inputs):
    text = render_card(replace(inputs, license=None))
    assert "states no licence" in text and "license:" not in text.split("---", 2)[1]
    linked = render_card(replace(inputs, license="other", license_name="llama3", license_link="LICENSE",
                                 source_revision=None))
    # The file was not copied, so the link goes to the base repository (pinned when the revision is known).
    assert ModelCard(linked).data.license_link == (
        "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/LICENSE")
    policy = render_card(replace(inputs, license="other", license_link="./USE_POLICY.md",
                                 license_file_copied=True))
    assert ModelCard(policy).data.license_link == (
        "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/fc7ac94680e38d7348cfa806e51218e6273104b0/USE_POLICY.md")


def test_other_method_is_named_honestly(inputs):
    pruned = replace(inputs, method="freq-prune", method_description="keep the 6 most-routed experts")
    text = render_card(pruned)
    assert "were reduced to 6" in text and "merged into 6" not in text
    assert "`freq-prune`: keep the 6 most-routed experts" in text
    assert "freq-prune" in ModelCard(text).data.tags


def test_calibration_dataset_kinds(inputs):
    assert card_mod.hub_dataset_id("allenai/c4") == "allenai/c4"
    assert card_mod.hub_dataset_id("c4") == "allenai/c4"
    assert card_mod.hub_dataset_id("my_text.jsonl") is None
    assert card_mod.hub_dataset_id("data/corpus.json.gz") is None
    local = render_card(replace(inputs, calibration_dataset="corpus.txt"))
    assert ModelCard(local).data.datasets is None
    assert "`corpus.txt`" in local


def test_pruned_checkpoint_is_described_as_pruned(inputs):
    merged_text = render_card(inputs)
    assert "no partner" in merged_text and "| Merged |" in merged_text
    pruned = replace(inputs, method="f-prune", clusters=[[[0], [3], [5]], [[1], [2], [7]]])
    text = render_card(pruned)
    assert "experts not listed were removed" in text and "no partner" not in text
    assert "| Pruned |" in text and "| Merged |" not in text


def test_local_source_has_no_hub_link_or_base_model(inputs):
    local = replace(inputs, source_id="my-moe", source_is_local=True)
    text = render_card(local)
    assert "`my-moe` (a local checkpoint)" in text and "huggingface.co/my-moe" not in text
    assert ModelCard(text).data.base_model is None
