"""The Space as on a Space: real "Sign in with Hugging Face" (OpenID Connect) against the loopback Hub, in Chromium.

`python space_app/app.py` runs in a subprocess with the environment a Space with `hf_oauth: true` has (SYSTEM=spaces,
SPACE_ID, OAUTH_CLIENT_ID / _SECRET / _SCOPES, OPENID_PROVIDER_URL pointing at the loopback Hub; no SPACE_HOST,
which would make gradio send the browser to https), so gradio serves its real OAuth routes through authlib, not its
local mock. The loopback Hub (tests/loopback_hub/oauth.py) approves the sign-in for the user it has "signed in"
and issues an OAuth access token. The Space's own HF_TOKEN is a different write-capable token of the same user:
only the Hub's token log tells which one a request used, and it must never be the Space's.

On a Space the calibration text must come from the Hub, so the loopback Hub serves it as a dataset repo.

    pytest tests/test_space_oauth_browser.py -q
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from loopback_hub import LoopbackHub
from test_space import SOURCE
from test_space_browser import CHROMIUM, JOB_TIMEOUT_MS, TARGET

ROOT = Path(__file__).resolve().parent.parent
SPACE_TOKEN = "hf_space_owner_write_0123"  # the Space's own secret: alice's classic write token
CALIBRATION = "upstream/calib-text"
SCOPES = "openid profile write-repos manage-repos"  # what space_app/README.md asks for
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def on_space(tiny_models, calib_file, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The loopback Hub and the Space app launched against it as a Space would launch it."""
    tmp = tmp_path_factory.mktemp("oauth-space")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with LoopbackHub() as hub:
        hub.add_user("alice", SPACE_TOKEN, orgs={"acme": "write", "readers": "read"})
        hub.seed_repo(SOURCE, {p.name: p for p in tiny_models["mixtral"].iterdir() if p.is_file()})
        hub.seed_dataset(CALIBRATION, {"calib.txt": calib_file})
        hub.oauth.register_app("space-client-id", "space-client-secret", redirect_prefix=f"{url}/login/callback",
                               scopes=SCOPES)
        hub.oauth.signed_in = "alice"
        keep = {"PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV"}
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update({
            "PYTHONPATH": str(ROOT), "HOME": str(tmp / "home"), "XDG_CACHE_HOME": str(tmp / "cache"),
            "HF_HOME": str(tmp / "hf_home"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": SPACE_TOKEN, "HC_SMOE_WORKDIR": str(tmp / "work"),
            "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            # What the Spaces runtime sets for an app with `hf_oauth: true`.
            "SYSTEM": "spaces", "SPACE_ID": "owner/hc-smoe", "OAUTH_CLIENT_ID": "space-client-id",
            "OAUTH_CLIENT_SECRET": "space-client-secret", "OAUTH_SCOPES": SCOPES, "OPENID_PROVIDER_URL": hub.endpoint,
        })
        log_path = tmp / "app.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen([sys.executable, str(ROOT / "space_app" / "app.py")], env=env, cwd=tmp,
                                    stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the Space app exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the Space app did not start in {START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield SimpleNamespace(hub=hub, url=url, log=log_path, work=tmp / "work")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture()
def page(on_space) -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM),
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 1000})
            tab.set_default_timeout(30_000)
            yield tab
        finally:
            browser.close()


def sign_in_and_fill(page: object, on_space: SimpleNamespace, target: str | None = None) -> None:
    from playwright.sync_api import expect

    page.goto(on_space.url)
    page.get_by_role("button", name="Sign in with Hugging Face").click()
    # The browser went to the loopback Hub's authorize endpoint and came back to /login/callback with a code.
    expect(page.get_by_role("button", name="Logout (alice)")).to_be_visible()
    page.get_by_label("Source model").fill(SOURCE)
    page.get_by_label("Experts to keep").fill("2")
    expect(page.get_by_label("Target repository")).to_have_value(TARGET)
    if target:
        page.get_by_label("Target repository").fill(target)
    page.get_by_label("Calibration dataset").fill(CALIBRATION)
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_label("Calibration samples").fill("4")
    page.get_by_label("Block length (tokens)").fill("64")
    page.locator("#tasks").get_by_title("Clear").click()  # no evaluation
    expect(page.get_by_label("Task folder")).to_be_hidden()  # on a Space: Hub ids only


def test_no_write_access_to_the_target_namespace_is_refused_before_compute(on_space, page):
    from playwright.sync_api import expect

    hub = on_space.hub
    sign_in_and_fill(page, on_space, target="readers/tiny-merged")
    page.get_by_role("button", name="Merge and push").click()
    status = page.locator("#status")
    expect(status).to_contain_text("only read access in the organisation readers", timeout=JOB_TIMEOUT_MS)
    expect(status).to_contain_text("Failed (stage: access)")
    # Refused before the weights were downloaded (the form's checks read only config.json), nothing created.
    assert not [p for _, p in hub.requests if p.startswith(f"/{SOURCE}/resolve/") and p.endswith(".safetensors")]
    assert not any(p == "/api/repos/create" for _, p in hub.requests)
    assert not hub.repo_exists("readers/tiny-merged")


def test_sign_in_merge_and_push_with_the_signed_in_users_token(on_space, page):
    from playwright.sync_api import expect

    hub = on_space.hub
    sign_in_and_fill(page, on_space)
    page.get_by_role("button", name="Merge and push").click()
    link = page.locator("#status a", has_text=TARGET)
    expect(link).to_be_visible(timeout=JOB_TIMEOUT_MS)
    assert link.get_attribute("href") == f"{hub.endpoint}/{TARGET}"

    files = hub.repo_files(TARGET)
    assert json.loads(files["config.json"])["num_local_experts"] == 2
    assert any(name.endswith(".safetensors") for name in files)
    # Sign-in issued one OAuth token per sign-in (one per test here); the push used the last one.
    issued = hub.oauth.issued[-1]
    assert issued.user == "alice" and issued.scopes == frozenset(SCOPES.split())
    pushed = [(m, p, name) for m, p, name in hub.token_log if TARGET in p]
    assert pushed and {name for *_, name in pushed} == {issued.display_name}, pushed
    assert any(p.startswith(f"/api/models/{TARGET}/commit/") for _, p, _ in pushed)
    # The Space's own token was never presented, for the push or anything else (source, calibration data).
    owner = hub.token_name(SPACE_TOKEN)
    assert all(name != owner for *_, name in hub.token_log), [e for e in hub.token_log if e[2] == owner]
    assert any(p.startswith(f"/datasets/{CALIBRATION}/resolve/") for _, p, _ in hub.token_log)
