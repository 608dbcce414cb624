"""The Space in a real browser: sign in, fill the form, merge a tiny model pulled from a loopback Hub, see it pushed.

Drives Debian's chromium (`apt-get install chromium`, at /usr/bin/chromium) with the playwright Python package; no
browser is downloaded. The app and the loopback Hub are set up as in tests/test_space.py (same fixtures). The
finished page is saved to test-artifacts/space_finished.png for a human to look at.

    pytest tests/test_space_browser.py -q
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hub import hf_env, hub  # noqa: F401  (pytest fixtures)
from test_space import SOURCE, local_env, pytestmark, space  # noqa: F401  (fixtures, warning filters)

from hc_smoe_hub.demo import task_dir
from hc_smoe_hub.methods import MethodOptions
from hc_smoe_hub.pipeline import default_repo_name

# The form is left at its default method, so the suggested name carries that method's name.
TARGET = "alice/" + default_repo_name(SOURCE, MethodOptions().method, "2")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
JOB_TIMEOUT_MS = 90_000


@pytest.fixture()
def page(space) -> Iterator[object]:  # noqa: F811
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`); the browser "
                    "tests drive it through playwright and never download a browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM),
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 1000})
            tab.set_default_timeout(20_000)
            yield tab
        finally:
            browser.close()


def test_sign_in_fill_merge_and_see_the_pushed_repo(space, page, calib_file):  # noqa: F811
    from playwright.sync_api import expect

    page.goto(space.url)
    page.get_by_role("button", name="Sign in with Hugging Face").click()
    # Gradio's local login mock signs in as the account of HF_TOKEN and reloads the page.
    expect(page.get_by_role("button", name="Logout (alice)")).to_be_visible()

    page.get_by_label("Source model").fill(SOURCE)
    page.get_by_label("Experts to keep").fill("2")
    target = page.get_by_label("Target repository")
    expect(target).to_have_value(TARGET)  # pre-filled from the signed-in user and the source
    page.get_by_label("Calibration dataset").fill(str(calib_file))

    page.get_by_text("Advanced", exact=True).click()
    page.get_by_label("Calibration samples").fill("4")
    page.get_by_label("Block length (tokens)").fill("64")
    page.locator("#tasks").get_by_title("Clear").click()  # drop the paper's eight tasks
    tasks = page.get_by_role("combobox", name="Evaluation tasks")
    tasks.fill("demo_mc")  # a local task (see Task folder), scored on 8 examples
    tasks.press("Enter")
    page.get_by_label("Examples per task").fill("8")
    page.get_by_label("Task folder").fill(str(task_dir()))

    page.get_by_role("button", name="Merge and push").click()
    link = page.locator("#status a", has_text=TARGET)
    expect(link).to_be_visible(timeout=JOB_TIMEOUT_MS)
    assert link.get_attribute("href") == f"{space.hub.endpoint}/{TARGET}"
    expect(page.locator("#results")).to_contain_text("demo_mc")
    log = page.locator("#log textarea")
    expect(log).to_have_value(re.compile(r"pushed .* to "))
    # The log follows its tail: the last lines are in view.
    assert log.evaluate("t => t.scrollTop + t.clientHeight >= t.scrollHeight - 2")
    expect(page.get_by_role("button", name="Merge and push")).to_be_enabled()

    files = space.hub.repo_files(TARGET)
    assert "config.json" in files and "README.md" in files
    assert any(name.endswith(".safetensors") for name in files)
    assert json.loads(files["config.json"])["num_local_experts"] == 2
    assert "demo_mc" in json.loads(files["eval_results.json"])["merged"]

    ARTIFACTS.mkdir(exist_ok=True)
    page.get_by_text("Advanced", exact=True).click()  # fold the settings away for the picture
    page.screenshot(path=str(ARTIFACTS / "space_finished.png"), full_page=True)
