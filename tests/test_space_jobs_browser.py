"""The Space sends a model too large for it to Hugging Face Jobs, streams the job's log, and reattaches on reload.

Chromium (Debian's, through playwright) drives the app of tests/test_space.py against a loopback Hub that serves
the Jobs API (tests/loopback_hub/jobs.py runs the job as a local subprocess). The Space's memory is capped at 1 MB
(`HC_SMOE_MEMORY_LIMIT`), so the tiny source model is "too large" and goes to Jobs with the signed-in user's
token. On Jobs the calibration must come from the Hub and the loopback Hub serves no datasets, so the job itself
stops at its calibration stage: the test checks what the page owes the user (the job's id, its log streaming in,
its outcome, the same job after a reload), not a push (tests/test_jobs.py checks the push from the CLI).

    pytest tests/test_space_jobs_browser.py -q
"""

from __future__ import annotations

import re

import pytest
from loopback_hub import LoopbackHub
from loopback_hub.jobs import Jobs
from test_hub import ALICE, hf_env  # noqa: F401  (pytest fixture)
from test_space import SOURCE, client, form, local_env, pytestmark, space  # noqa: F401  (fixtures, warning filters)
from test_space_browser import page  # noqa: F401  (fixture)

from hc_smoe_hub import hub_jobs, jobs_panel
from hc_smoe_hub.hub_jobs import JobSpecification

JOB_TIMEOUT_MS = 90_000


@pytest.fixture()
def hub(hf_env, monkeypatch):  # noqa: F811  (this module's hub also serves Jobs)
    with LoopbackHub(extensions={"jobs": Jobs}) as server:
        server.add_user("alice", ALICE)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        try:
            yield server
        finally:
            server.extensions["jobs"].close()


def test_too_large_for_the_space_goes_to_jobs_and_a_reload_reattaches(space, page, monkeypatch):  # noqa: F811
    from playwright.sync_api import expect

    monkeypatch.setenv("HC_SMOE_MEMORY_LIMIT", "1MB")  # local_env clears it; read when the job is planned
    page.goto(space.url)
    page.get_by_role("button", name="Sign in with Hugging Face").click()
    expect(page.get_by_role("button", name="Logout (alice)")).to_be_visible()
    page.get_by_label("Source model").fill(SOURCE)
    page.get_by_label("Experts to keep").fill("2")
    expect(page.get_by_role("radio", name="this Space")).to_be_checked()
    page.get_by_text("Advanced", exact=True).click()
    page.locator("#tasks").get_by_title("Clear").click()  # no evaluation
    page.get_by_role("button", name="Merge and push").click()

    status = page.locator("#status")
    expect(status).to_contain_text("Too large for this Space", timeout=30_000)
    expect(status).to_contain_text("Running on Hugging Face Jobs: job")
    jobs = space.hub.extensions["jobs"]
    (job_id,) = jobs.jobs
    (spec,) = jobs.submitted
    assert spec["secrets"] == {"HF_TOKEN": ALICE} and ALICE not in str(spec["command"]) + str(spec["environment"])
    assert "--skip-eval" in spec["command"] and SOURCE in spec["command"]

    page.reload()  # the browser remembers the job: the page follows it again, nothing is submitted twice
    expect(page.locator("#status")).to_contain_text(job_id, timeout=30_000)
    expect(page.locator("#status")).to_contain_text(f"Job {job_id} ended ERROR", timeout=JOB_TIMEOUT_MS)
    # The job's own output reached the page: it got as far as its calibration, which needs a Hub dataset.
    assert "calibration" in jobs.log_text(job_id).lower(), jobs.log_text(job_id)
    expect(page.locator("#log textarea")).to_have_value(re.compile(r"calibration", re.IGNORECASE))
    assert len(jobs.jobs) == 1
    assert jobs.wait(job_id, timeout=5) == "ERROR"


def test_choosing_jobs_runs_the_cli_checks_first(space, calib_file):  # noqa: F811
    """The Jobs choice refuses, in one line and before submitting, what a remote machine cannot do."""
    outputs = client(space.url, oauth_token=ALICE).predict(**form(calib_file, run_on=jobs_panel.ON_JOBS),
                                                           api_name="/merge_and_push")
    assert "Cannot start" in outputs[0] and "local file the job cannot read" in outputs[0].replace("\\", "")
    assert space.hub.extensions["jobs"].jobs == {}


def test_a_completed_job_ends_with_the_pushed_repo_link(space):  # noqa: F811
    """What the page shows of a job that completed: the repo from the job's label, linked, and the job."""
    spec = JobSpecification(image="python:3.12", command=["python", "-c", "print('merged and pushed')"],
                            flavor="t4-small", timeout_s=60, labels={"app": "hc-smoe-hub", "repo": "alice--tiny-2e"})
    job = hub_jobs.submit(spec, ALICE, "alice")
    updates = list(jobs_panel.follow(f"alice/{job.id}", ALICE, None, None))
    status, log_text = updates[-1][0], updates[-1][1]
    assert status.startswith(f"### Pushed to [alice/tiny-2e]({space.hub.endpoint}/alice/tiny-2e)")
    assert job.id in status and log_text == "merged and pushed"
