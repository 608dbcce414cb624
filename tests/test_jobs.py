"""`hc-smoe-push --on-jobs` against the loopback Hub's Jobs API (tests/loopback_hub/jobs.py runs each job locally).

The real huggingface_hub client submits, streams the log and inspects; the loopback Hub runs the job's command as
a subprocess with its secrets as environment variables, so the job really installs (offline: the package under
test satisfies `pip install hc-smoe-hub[eval]==<version>`), merges the shipped demo model and pushes it back.

    pytest tests/test_jobs.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback_hub import LoopbackHub
from loopback_hub.jobs import Jobs
from test_hub import ALICE, BOB, hf_env  # noqa: F401  (pytest fixture)

from hc_smoe_hub import __version__, hub_jobs, jobs_flavor
from hc_smoe_hub.cli import build_parser, main
from hc_smoe_hub.demo import DEMO_MODELS
from hc_smoe_hub.jobs_submit import install_requirement, job_arguments
from hc_smoe_hub.merge import read_config

CAROL = "hf_carol_classic_jobs"
FAST = ["--num-samples", "4", "--seq-len", "64", "--limit", "8", "--yes"]
# A Mixtral-8x7B-v0.1 config.json (the fields sizing reads).
MIXTRAL_8X7B = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# Qwen3-MoE-shaped, ~1 trillion parameters: 2 TB in bf16, more than the largest flavor's 1,128 GB of GPU memory.
HUGE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 4096,
        "moe_intermediate_size": 1536, "intermediate_size": 12288, "num_hidden_layers": 94,
        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 512,
        "num_experts_per_tok": 8, "vocab_size": 151936, "torch_dtype": "bfloat16"}


@pytest.fixture()
def jobs_hub(hf_env, monkeypatch, tmp_path):  # noqa: F811
    with LoopbackHub(extensions={"jobs": Jobs}) as server:
        server.add_user("alice", ALICE, orgs={"acme": "write"})
        server.add_user("bob", BOB, can_write=False)
        server.add_user("carol", CAROL)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.chdir(tmp_path)
        try:
            yield server
        finally:
            server.extensions["jobs"].close()


def _submitted(hub: LoopbackHub) -> list[tuple[str, str]]:
    return [(m, p) for m, p in hub.requests if m == "POST" and p.startswith("/api/jobs/")]


def test_on_jobs_merges_there_pushes_and_keeps_the_token_secret(jobs_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    code = main(["--demo", "--keep", "6", "--on-jobs", "--repo-id", "alice/demo-on-jobs", *FAST])
    out = capsys.readouterr().out
    assert code == 0, out
    jobs = jobs_hub.extensions["jobs"]
    (job_id,) = jobs.jobs
    assert jobs.jobs[job_id].stage == "COMPLETED"
    # The plan came first: the cheapest GPU flavor holds the demo model.
    assert "Hugging Face Jobs: t4-small" in out and "$0.40/hour" in out and "estimated time" in out
    # The job's own output streamed to this terminal, then the outcome.
    assert "merged 8 -> 6 experts per layer" in out
    assert out.rstrip().endswith(f"pushed to {jobs_hub.endpoint}/alice/demo-on-jobs\njob: {job_id} "
                                 f"({jobs_hub.endpoint}/jobs/alice/{job_id})")

    files = jobs_hub.repo_files("alice/demo-on-jobs")
    assert json.loads(files["config.json"])["num_local_experts"] == 6
    assert "model.safetensors" in files and "README.md" in files
    assert "demo_mc" in json.loads(files["eval_results.json"])["merged"]
    # The push was the job's, with alice's token, which reached the job only as a secret.
    assert ("POST", "/api/models/alice/demo-on-jobs/commit/main", "alice") in jobs_hub.auth_log
    (spec,) = jobs.submitted
    assert spec["secrets"] == {"HF_TOKEN": ALICE}
    assert ALICE not in json.dumps(spec["command"]) and ALICE not in json.dumps(spec["environment"])
    assert spec["command"][3] == f"hc-smoe-hub[eval]=={__version__}"
    assert spec["command"][4:] == ["--demo", "--keep", "6", "--num-samples", "4", "--seq-len", "64", "--limit", "8",
                                   "--repo-id", "alice/demo-on-jobs"]
    assert spec["flavor"] == "t4-small" and spec["timeoutSeconds"] == 3600


def test_ctrl_c_detaches_and_says_how_to_follow_or_cancel(jobs_hub, tmp_path):
    env = {**os.environ, "HF_TOKEN": ALICE, "PYTHONUNBUFFERED": "1"}
    jobs = jobs_hub.extensions["jobs"]
    jobs.hold()  # the job cannot finish before the Ctrl-C, however loaded the machine is
    cli = subprocess.Popen([sys.executable, "-m", "hc_smoe_hub.cli", "--demo", "--on-jobs", "--repo-id",
                            "alice/detached", *FAST], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert cli.stdout is not None
        head = ""
        for line in iter(cli.stdout.readline, ""):  # until the CLI says it submitted, or exits
            head += line
            if " submitted: " in line:
                break
        assert " submitted: " in head, "the CLI never said it submitted a job"
        (job_id,) = jobs.jobs
        time.sleep(1.0)  # the CLI is following the log now
        cli.send_signal(signal.SIGINT)
        rest, err = cli.communicate(timeout=30)
        out = head + rest
    finally:
        cli.kill()
    assert cli.returncode == 130, err
    assert f"job {job_id} submitted" in out
    assert f"hf jobs logs -f {job_id}" in err and f"hf jobs cancel {job_id}" in err
    assert jobs.jobs[job_id].stage == "RUNNING"  # detached, not cancelled
    hub_jobs.cancel(job_id, "alice", ALICE)
    assert jobs.wait(job_id, timeout=10) == "CANCELED"


@pytest.mark.parametrize(("argv", "token", "expected"), [
    (["--demo", "--repo-id", "alice/x", "--no-push"], ALICE, "drop --no-push"),
    (["upstream/tiny", "--keep", "2", "--calibration", "notes.txt"], ALICE, "local file the job cannot read"),
    (["--demo", "--repo-id", "alice/x", "--flavor", "a100-huge"], ALICE, "unknown --flavor 'a100-huge'"),
    (["--demo", "--repo-id", "alice/x"], BOB, "read-only and cannot start Jobs"),
    (["--demo", "--repo-id", "alice/x"], CAROL, "carol cannot run Hugging Face Jobs"),
    (["upstream/huge", "--keep", "256"], ALICE, "no Hugging Face Jobs flavor holds this job"),
    (["./local-model", "--keep", "2"], ALICE, "is not a Hub repo id"),
])
def test_refused_in_one_line_before_anything_is_submitted(jobs_hub, monkeypatch, capsys, argv, token, expected):
    jobs_hub.extensions["jobs"].deny("carol")
    jobs_hub.seed_repo("upstream/huge", {"config.json": json.dumps(HUGE).encode()})
    Path("local-model").mkdir()
    monkeypatch.setenv("HF_TOKEN", token)
    code = main([*argv, "--on-jobs", "--yes"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.count("\n") == 1 and err.startswith("hc-smoe-push: error: ")
    assert _submitted(jobs_hub) == []
    assert token not in err


def test_flavor_is_the_cheapest_that_holds_the_job(jobs_hub):
    flavors = hub_jobs.list_flavors(ALICE)  # the loopback Hub's table, read by the real client
    by_name = {f.name: f for f in flavors}
    assert by_name["l40sx4"].gpus == 4 and by_name["l40sx4"].gpu_bytes == 48 * 10**9
    assert by_name["t4-small"].usd_per_hour == pytest.approx(0.40)

    def choice(config: dict, keep: int, evaluate: bool) -> str:
        need = jobs_flavor.need_for(config, keep, evaluate=evaluate, tokens=32 * 2048)
        return jobs_flavor.choose_flavor(flavors, need, None).name

    demo = read_config(DEMO_MODELS["mixtral"])
    assert choice(demo, 6, evaluate=True) == "t4-small"
    # Mixtral-8x7B: 93 GB in bf16, evaluated whole: an 80 GB A100 is too small, one H200 is cheaper than 4 x L40S.
    assert choice(MIXTRAL_8X7B, 6, evaluate=True) == "h200"
    # Without evaluation: one layer's merge at the default calibration (~21 GB by the formula; 18 GiB measured on an
    # H200) is too much for a 16 GB T4 but fits a 24 GB L4, and source + output (~163 GB) need more disk than that.
    need = jobs_flavor.need_for(MIXTRAL_8X7B, 6, evaluate=False, tokens=32 * 2048)
    assert 16e9 < need.gpu_each < 24e9 < need.disk
    assert choice(MIXTRAL_8X7B, 6, evaluate=False) == "l4x1"
    assert jobs_flavor.choose_flavor(flavors, need, "a100-large").name == "a100-large"  # --flavor overrides


def test_the_job_installs_the_submitting_version_or_its_commit():
    assert install_requirement() == f"hc-smoe-hub[eval]=={__version__}"  # this checkout: editable, no commit
    assert install_requirement({"url": "file:///src/hc-smoe-hub", "dir_info": {"editable": True}}) \
        == f"hc-smoe-hub[eval]=={__version__}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    from_git = {"url": "https://github.com/acme/hc-smoe-hub", "vcs_info": {"vcs": "git", "commit_id": commit}}
    assert install_requirement(from_git) == f"hc-smoe-hub[eval] @ git+https://github.com/acme/hc-smoe-hub@{commit}"


def test_job_arguments_drop_what_only_concerns_the_submission():
    argv = ["org/model", "--keep", "6", "--token", "hf_secret", "--on-jobs", "--flav", "h200", "--timeout=2h",
            "-y", "--output-dir", "out", "--tasks", "arc_easy", "--token=hf_other", "--repo-id", "me/x"]
    assert job_arguments(argv, "me/x", build_parser()) == ["org/model", "--keep", "6", "--tasks", "arc_easy",
                                                            "--repo-id", "me/x"]
    assert jobs_flavor.parse_timeout("90m") == 5400 and jobs_flavor.parse_timeout("3600") == 3600
    with pytest.raises(hub_jobs.JobsError, match="--timeout"):
        jobs_flavor.parse_timeout("soon")


def test_without_a_terminal_it_asks_for_yes_instead_of_submitting(jobs_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    code = main(["--demo", "--on-jobs", "--repo-id", "alice/x", "--skip-eval"])  # pytest's stdin is no terminal
    out, err = capsys.readouterr()
    assert code == 2 and "pass --yes" in err
    assert "Hugging Face Jobs: t4-small" in out  # the plan was shown, nothing submitted
    assert _submitted(jobs_hub) == []
