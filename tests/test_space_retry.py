"""No false promises: after a failed push the Space keeps the merged model (within HC_SMOE_SPACE_KEEP_GB) and retries.

The push fails because the loopback Hub is told to reject the next commit (`fail_next`, a non-transient 403, so
the client does not retry on its own). Driven at the level of the app's handlers (`merge_and_push` in app.py,
`retry_panel.retry_push`) with the real job, the real huggingface_hub client and the loopback Hub of
tests/test_space.py; the disk budget and eviction rules of hc_smoe_hub/space_keep.py directly; and once in
Chromium (as tests/test_space_browser.py drives the page): the failure, the button, the retry, the link.

    pytest tests/test_space_retry.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from test_hub import ALICE, hf_env, hub  # noqa: F401  (pytest fixtures)
from test_space import SOURCE, app, form, local_env, pytestmark, space  # noqa: F401  (fixtures, warning filters)
from test_space_browser import JOB_TIMEOUT_MS, page  # noqa: F401  (fixture)

from hc_smoe_hub import retry_panel, space_keep
from hc_smoe_hub.methods import MethodOptions
from hc_smoe_hub.pipeline import default_repo_name

TARGET = "alice/" + default_repo_name("upstream/tiny-moe", MethodOptions().method, "2")
COMMIT = r"^/api/models/alice/[^/]+/commit/"


def _token() -> gr.OAuthToken:
    return gr.OAuthToken(token=ALICE, scope="openid profile write-repos manage-repos", expires_at=0)


def _failed_push(local_env, calib_file) -> tuple[str, object, str | None]:  # noqa: F811
    """Run a job whose commit the Hub rejects; (status, retry button update, kept folder)."""
    local_env.hub.fail_next("POST", COMMIT, status=403)
    *_, (status, _log, _table, button, retry, kept) = app.merge_and_push(
        **form(calib_file, method=MethodOptions().method), oauth_token=_token())
    assert button.interactive is True
    return status, retry, kept


def test_a_failed_push_keeps_the_model_and_retry_pushes_it(local_env, calib_file, monkeypatch):  # noqa: F811
    monkeypatch.delenv(space_keep.KEEP_ENV, raising=False)  # the default budget (20 GB) holds a tiny model
    status, retry, kept = _failed_push(local_env, calib_file)
    plain = status.replace("\\", "")
    assert plain.startswith("### Failed (stage: push)") and "403" in plain, status
    assert "is kept on this Space" in plain and "Retry the push" in plain
    # The CLI's advice (a server path, an hc-smoe-push command) is not shown to a Space user.
    assert "hc-smoe-push" not in plain and str(local_env.tmp) not in plain
    assert retry.visible is True and retry.interactive is True
    record = space_keep.load(kept)
    assert record is not None and record.repo_id == TARGET and Path(record.folder, "config.json").is_file()
    assert (Path(record.folder) / "README.md").is_file()  # the card was written before the push failed
    assert not local_env.hub.repo_files(TARGET).keys() - {".gitattributes"}  # the rejected commit left nothing

    # A retry that fails again says so and still keeps the model.
    local_env.hub.fail_next("POST", COMMIT, status=403)
    *_, (again, button, state) = retry_panel.retry_push(kept, _token())
    assert again.startswith("### The push failed again") and "still kept" in again
    assert button.interactive is True and state == gr.skip()
    assert space_keep.load(kept) is not None

    updates = list(retry_panel.retry_push(kept, _token()))
    assert updates[0][1].interactive is False  # the button is disabled while the push runs
    final, button, state = updates[-1]
    assert final.startswith(f"### Pushed to [{TARGET}]({local_env.hub.endpoint}/{TARGET})"), final
    assert button.visible is False and state is None
    files = local_env.hub.repo_files(TARGET)
    assert json.loads(files["config.json"])["num_local_experts"] == 2
    assert "README.md" in files and any(name.endswith(".safetensors") for name in files)
    assert not Path(kept).exists()  # pushed: the kept copy is gone

    *_, (gone, button, state) = retry_panel.retry_push(kept, _token())  # e.g. a second click from a stale page
    assert gone.startswith("### Nothing to retry") and button.visible is False and state is None


@pytest.mark.parametrize(("budget", "words"), [
    ("0.000001", ["The merged model was deleted", "over the 0.00 GB", space_keep.KEEP_ENV]),
    ("0", ["The merged model was deleted", "keeps no merged models", space_keep.KEEP_ENV]),
], ids=["over-budget", "keeping-off"])
def test_a_model_over_the_budget_is_deleted_and_the_page_says_so(local_env, calib_file, monkeypatch, budget,  # noqa: F811
                                                                 words):
    monkeypatch.setenv(space_keep.KEEP_ENV, budget)
    status, retry, kept = _failed_push(local_env, calib_file)
    plain = status.replace("\\", "")
    for word in words:
        assert word in plain, (word, status)
    assert "kept on this Space" not in plain
    assert retry.visible is False and kept is None
    assert not any(local_env.tmp.glob(space_keep.WORKDIR_PREFIX + "*"))


def test_a_failed_evaluation_does_not_claim_the_model_is_kept(local_env, calib_file, monkeypatch):  # noqa: F811
    def failing_eval(*args, **kwargs):
        raise RuntimeError("lm-eval ran out of memory")

    monkeypatch.setattr("hc_smoe_hub.pipeline._evaluate_both", failing_eval)
    from hc_smoe_hub.demo import task_dir

    *_, (status, _log, _table, _button, retry, kept) = app.merge_and_push(
        **form(calib_file, tasks=["demo_mc"], limit=8, include_path=str(task_dir())), oauth_token=_token())
    plain = status.replace("\\", "")
    assert plain.startswith("### Failed (stage: evaluation)") and "out of memory" in plain, status
    assert "was not kept on this Space" in plain and retry.visible is False and kept is None
    assert not any(local_env.tmp.glob(space_keep.WORKDIR_PREFIX + "*"))
    assert not local_env.hub.repo_exists(TARGET)


def test_in_the_browser_the_retry_button_pushes_the_kept_model(space, page, calib_file):  # noqa: F811
    from playwright.sync_api import expect

    page.goto(space.url)
    page.get_by_role("button", name="Sign in with Hugging Face").click()
    expect(page.get_by_role("button", name="Logout (alice)")).to_be_visible()
    page.get_by_label("Source model").fill(SOURCE)
    page.get_by_label("Experts to keep").fill("2")
    page.get_by_label("Calibration dataset").fill(str(calib_file))
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_label("Calibration samples").fill("4")
    page.get_by_label("Block length (tokens)").fill("64")
    page.locator("#tasks").get_by_title("Clear").click()
    retry = page.get_by_role("button", name="Retry the push")
    expect(retry).to_be_hidden()

    space.hub.fail_next("POST", COMMIT, status=403)
    page.get_by_role("button", name="Merge and push").click()
    status = page.locator("#status")
    expect(status).to_contain_text("Failed (stage: push)", timeout=JOB_TIMEOUT_MS)
    expect(status).to_contain_text("is kept on this Space")
    expect(retry).to_be_visible()
    retry.click()
    link = page.locator("#status a", has_text=TARGET)
    expect(link).to_be_visible(timeout=JOB_TIMEOUT_MS)
    assert link.get_attribute("href") == f"{space.hub.endpoint}/{TARGET}"
    expect(retry).to_be_hidden()
    assert "config.json" in space.hub.repo_files(TARGET)
    assert not any(space.tmp.glob(space_keep.WORKDIR_PREFIX + "*"))


# ---------------------------------------------------------------------------- the budget, directly


def _workdir(root: Path, name: str, size: int) -> Path:
    work = root / f"{space_keep.WORKDIR_PREFIX}{name}"
    (work / "model").mkdir(parents=True)
    (work / "model" / "model.safetensors").write_bytes(b"\0" * size)
    return work


def test_keeping_evicts_the_oldest_first_and_refuses_what_cannot_fit(tmp_path, monkeypatch):
    monkeypatch.setenv(space_keep.KEEP_ENV, str(2500 / 1e9))  # room for two folders of 1000 bytes
    kept = []
    for name in ("a", "b", "c"):
        work = _workdir(tmp_path, name, 1000)
        kept.append(space_keep.keep(work, work / "model", f"alice/{name}", private=False, overwrite=False))
    assert all(k is not None for k in kept)
    assert [Path(k.workdir).name for k in space_keep.kept_under(tmp_path)] == ["hc-smoe-space-b", "hc-smoe-space-c"]
    assert space_keep.load(kept[0].workdir) is None and not Path(kept[0].workdir).exists()

    big = _workdir(tmp_path, "big", 3000)  # larger than the whole budget: deleted, nothing evicted for it
    assert space_keep.keep(big, big / "model", "alice/big", private=True, overwrite=False) is None
    assert not big.exists() and len(space_keep.kept_under(tmp_path)) == 2

    assert space_keep.release_all(tmp_path) == 2 and not list(tmp_path.iterdir())


def test_budget_setting_and_release_guard(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(space_keep.KEEP_ENV, raising=False)
    assert space_keep.keep_budget() == int(space_keep.DEFAULT_KEEP_GB * 1e9)
    monkeypatch.setenv(space_keep.KEEP_ENV, "1.5")
    assert space_keep.keep_budget() == 1_500_000_000
    for bad in ("lots", "-3", "nan"):
        monkeypatch.setenv(space_keep.KEEP_ENV, bad)
        assert space_keep.keep_budget() == int(space_keep.DEFAULT_KEEP_GB * 1e9)
    assert "ignoring HC_SMOE_SPACE_KEEP_GB" in caplog.text
    other = tmp_path / "not-ours"
    other.mkdir()
    space_keep.release(other)  # gradio's State callback only ever deletes this app's work folders
    assert other.exists()
    space_keep.release(None)
    assert space_keep.load(None) is None and space_keep.load(tmp_path / "missing") is None
