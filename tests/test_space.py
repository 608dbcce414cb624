"""The Space (space_app/app.py) driven through its HTTP API with gradio_client, against a loopback Hub.

The app is launched in process (`prevent_thread_lock=True`) on 127.0.0.1. Hub access goes to the `LoopbackHub`
of tests/hub_server.py through three routes, all set per test:

- `HF_ENDPOINT` (the environment): read at call time by `hc_smoe_hub.hub` and by the app's links;
- `huggingface_hub.constants.ENDPOINT`: frozen at import, read at call time by `HfApi()` and transformers;
- `huggingface_hub.hf_api.api.endpoint`: the module-level `HfApi` behind `huggingface_hub.whoami`, which gradio's
  local login mock calls (with `HF_TOKEN`) whenever the app is built, to make the mocked profile.

Everything else a job writes goes under the test's tmp_path (HF_HOME from test_hub's `hf_env`, HOME, XDG_CACHE_HOME,
HC_SMOE_WORKDIR), and `hf_env` fails any huggingface_hub request that leaves 127.0.0.1.

Sign-in is exercised both ways a client can do it: `Client(oauth_token=...)` (the token reaches the handler's
`gr.OAuthToken`), and gradio's mocked OAuth routes outside a Space (`/login/huggingface` -> `/login/callback` sets a
session cookie whose access token is a fixed mock value; the app then pushes with this machine's token, `HF_TOKEN`).

    pytest tests/test_space.py -q
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import gradio as gr
import httpx
import pytest
import yaml
from gradio_client import Client
from huggingface_hub import constants, hf_api
from test_hub import ALICE, hf_env, hub  # noqa: F401  (pytest fixtures)

from hc_smoe_hub import space_jobs
from hc_smoe_hub.demo import task_dir
from hc_smoe_hub.evaluation import PAPER_TASKS

ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = ROOT / "space_app"
SOURCE = "upstream/tiny-moe"
TARGET = "alice/tiny-moe-hc-smoe-2e"  # default_repo_name(SOURCE, "hc-smoe", "2") under the signed-in user

# Gradio announces its local login mock with a UserWarning each time an app with a LoginButton is built, and its
# queue trips pandas 3 deprecations while it serialises a Dataframe: neither is ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Gradio does not support OAuth features outside of a Space"),
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def load_app() -> ModuleType:
    """space_app/app.py as a module (the folder is a Space, not a package)."""
    name = "hc_smoe_space_app"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


app = load_app()


def form(calib: Path, **changes: object) -> dict[str, object]:
    """Keyword arguments of the merge_and_push endpoint: a fast job (tiny blocks, no evaluation)."""
    values: dict[str, object] = dict(
        source=SOURCE, keep="2", calibration=str(calib), repo_id="", method="hc-smoe", linkage="average",
        merge="freq", router="fit", num_samples=4, seq_len=64, tasks=[], limit=0, include_path="", private=False,
        overwrite=False,
    )
    values.update(changes)
    return values


@pytest.fixture()
def local_env(hub, tiny_models, tmp_path, monkeypatch) -> SimpleNamespace:  # noqa: F811
    """A machine logged in as alice (token ALICE) on the loopback Hub, with the tiny Mixtral seeded as SOURCE.

    Gradio builds the app when a Blocks closes, and outside a Space that already calls `whoami` for its login
    mock: even `build_demo()` needs this.
    """
    hub.seed_repo(SOURCE, {p.name: p for p in tiny_models["mixtral"].iterdir() if p.is_file()})
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # lm-eval score cache and anything else under ~
    monkeypatch.setenv("HC_SMOE_WORKDIR", str(tmp_path))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    for var in ("SYSTEM", "SPACE_ID", "SPACES_ZERO_GPU", "HC_SMOE_MEMORY_LIMIT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    return SimpleNamespace(hub=hub, tmp=tmp_path)


@pytest.fixture()
def space(local_env) -> Iterator[SimpleNamespace]:
    """The app launched on 127.0.0.1 in this process."""
    demo = app.build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", **app.launch_kwargs())
    try:
        yield SimpleNamespace(hub=local_env.hub, url=url, demo=demo, tmp=local_env.tmp)
    finally:
        demo.close()


def client(url: str, **kwargs: object) -> Client:
    return Client(url, verbose=False, download_files=False, analytics_enabled=False, **kwargs)


def mocked_login(url: str) -> dict[str, str]:
    """Go through gradio's mocked OAuth routes like the browser does; return the session cookie."""
    with httpx.Client(base_url=url) as http:
        first = http.get("/login/huggingface")
        assert first.status_code in (302, 307), first.text
        callback = http.get(first.headers["location"])
        assert callback.status_code in (302, 307), callback.text
        # The cookie is Secure (gradio sets https_only): httpx would not send it back over http, so pass it along.
        return {"session": callback.cookies["session"]}


def status_of(outputs: tuple) -> str:
    return outputs[0]


# ---------------------------------------------------------------------------- the page, without a server


def test_page_has_the_form_and_one_job_at_a_time(local_env):
    demo = app.build_demo()
    components = demo.config["components"]
    labels = {c["props"].get("label"): c for c in components if c["props"].get("label")}
    for label in ("Source model", "Experts to keep", "Calibration dataset", "Target repository", "Advanced",
                  "Method", "Linkage", "Router strategy", "Calibration samples", "Block length (tokens)",
                  "Evaluation tasks", "Private repository", "Log"):
        assert label in labels, label
    assert labels["Calibration dataset"]["props"]["value"] == "c4"
    assert labels["Evaluation tasks"]["props"]["value"] == PAPER_TASKS
    assert labels["Advanced"]["type"] == "accordion"
    assert labels["Task folder"]["props"]["visible"] is True  # local run: an lm-eval include path is allowed
    assert any(isinstance(block, gr.LoginButton) for block in demo.blocks.values())
    assert any(c["props"].get("value") == "Merge and push" for c in components if c["type"] == "button")
    merge = next(fn for fn in demo.fns.values() if fn.api_name == "merge_and_push")
    assert merge.concurrency_limit == 1 and merge.queue
    assert demo.enable_queue


def test_on_a_space_the_task_folder_is_hidden_and_local_paths_refused(monkeypatch, calib_file):
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "someone/hc-smoe")
    # What a Space with `hf_oauth: true` provides; gradio.oauth read these at import.
    for name, value in {"OAUTH_CLIENT_ID": "client", "OAUTH_CLIENT_SECRET": "secret",
                        "OAUTH_SCOPES": "openid profile write-repos manage-repos",
                        "OPENID_PROVIDER_URL": "https://hub.invalid"}.items():
        monkeypatch.setattr(gr.oauth, name, value)
    demo = app.build_demo()
    folder = next(c for c in demo.config["components"] if c["props"].get("label") == "Task folder")
    assert folder["props"]["visible"] is False
    with pytest.raises(app.HcSmoeError, match="only reads models from the Hub"):
        app.prepare_job(**form(calib_file, source=str(calib_file.parent)), token="hf_user")
    with pytest.raises(app.HcSmoeError, match="local calibration files"):
        app.prepare_job(**form(calib_file), token="hf_user")


def test_on_a_space_only_the_signed_in_users_token_is_used(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_space_owner_secret")
    mock = gr.OAuthToken(token=space_jobs.MOCK_OAUTH_TOKEN, scope="openid", expires_at=0)
    user = gr.OAuthToken(token="hf_oauth_user", scope="openid write-repos", expires_at=0)
    monkeypatch.delenv("SYSTEM", raising=False)
    assert app.resolve_user_token(mock) == "hf_space_owner_secret"  # locally the mock stands for this machine
    assert app.resolve_user_token(user) == "hf_oauth_user"
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "someone/hc-smoe")
    assert app.resolve_user_token(user) == "hf_oauth_user"
    assert app.resolve_user_token(mock) == space_jobs.MOCK_OAUTH_TOKEN  # never swapped for the owner's token
    no_write = gr.OAuthToken(token="hf_oauth_user", scope="openid profile", expires_at=0)
    with pytest.raises(app.HcSmoeError, match="OAuth scopes lack write-repos"):
        app.resolve_user_token(no_write)  # refused before compute: whoami would not tell, the push would fail
    for signed_out in (None, gr.OAuthToken(token="", scope="", expires_at=0)):
        with pytest.raises(app.HcSmoeError, match="sign in"):
            app.resolve_user_token(signed_out)


def test_zero_gpu_decorator_and_duration(monkeypatch):
    # Off ZeroGPU (with the `spaces` package or without it) the job function is the plain generator.
    assert app.run_plan.__name__ == "run_plan"
    seen = {}

    def fake_gpu(duration):
        def wrap(fn):
            seen["fn"], seen["duration"] = fn, duration
            return fn
        return wrap

    monkeypatch.setattr(app, "spaces", SimpleNamespace(GPU=fake_gpu))
    app._gpu(duration=lambda plan: plan.gpu_seconds)(app.run_plan)
    assert seen["duration"](SimpleNamespace(gpu_seconds=321)) == 321
    small, big = space_jobs.gpu_seconds(10**9, 0, None), space_jobs.gpu_seconds(90 * 10**9, 0, None)
    assert 60 <= small < big
    assert space_jobs.gpu_seconds(10**9, 8, None) > space_jobs.gpu_seconds(10**9, 8, 100) > small


def test_a_failing_job_stream_is_reported_and_the_button_comes_back(local_env, monkeypatch, calib_file):
    def refused_slot(plan):
        yield [("stage", "access"), ("log", "12:00:00 INFO hc_smoe_hub.pipeline: stage access done in 0.1s")]
        raise gr.Error("You have exceeded your GPU quota")  # what ZeroGPU raises when it will not schedule a job

    monkeypatch.setattr(app, "run_plan", refused_slot)
    token = gr.OAuthToken(token=ALICE, scope="", expires_at=0)
    *_, (status, log, table, button, retry, kept) = app.merge_and_push(**form(calib_file), oauth_token=token)
    assert status.startswith("### Failed (stage: access)") and "GPU quota" in status
    assert "stage access done" in log
    assert button.interactive is True and table.visible is False
    assert retry.visible is False and kept is None  # failed before the merge: nothing to retry
    assert not any(local_env.tmp.glob("hc-smoe-space-*"))


def test_results_table_rows():
    before = {"arc_easy": {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.4}, "rte": {"acc": 0.6}}
    after = {"arc_easy": {"acc": 0.45, "acc_stderr": 0.01, "acc_norm": 0.41}, "rte": {"acc": 0.62}}
    rows = app.results_rows(before, after)
    assert rows[0] == ["arc_easy", "acc", "0.5000", "0.4500", "-0.0500"]
    assert ["arc_easy", "acc_norm", "0.4000", "0.4100", "+0.0100"] in rows
    assert not any(r[1].endswith("_stderr") for r in rows)
    assert rows[-1] == ["mean (paper headline)", "acc", "0.5500", "0.5350", "-0.0150"]
    assert app.results_rows(None, None) == []


def test_space_metadata_and_requirements():
    text = (SPACE_DIR / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["python_version"] == "3.12"
    assert meta["sdk_version"].split(".")[0] == gr.__version__.split(".")[0]
    assert meta["hf_oauth"] is True and set(meta["hf_oauth_scopes"]) >= {"write-repos", "manage-repos"}
    # The Space installs the package's dependencies from requirements.txt: keep them in step with pyproject.
    requirements = (SPACE_DIR / "requirements.txt").read_text().lower().replace("_", "-")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + ["lm-eval", "matplotlib"]:
        name = dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-")
        assert name in requirements, name


# ---------------------------------------------------------------------------- through the HTTP API


def test_merge_and_push_streams_the_log_and_ends_with_link_and_table(space, calib_file):
    job = client(space.url, oauth_token=ALICE).submit(
        **form(calib_file, tasks=["demo_mc"], limit=8, include_path=str(task_dir())), api_name="/merge_and_push")
    final = job.result(timeout=300)
    updates = job.outputs()
    status, log, table = final[:3]  # gradio_client leaves out the button's update
    link = f"{space.hub.endpoint}/{TARGET}"
    assert f"[{TARGET}]({link})" in status, status
    stages = [u[0] for u in updates if u[0].startswith("### Stage")]
    assert any("download" in s for s in stages) and any("push" in s for s in stages), stages
    logs = [u[1] for u in updates]
    assert len({len(x) for x in logs}) > 2  # the log grew while the job ran
    assert "merging" in log or "wrote" in log
    assert ALICE not in log and ALICE not in status
    files = space.hub.repo_files(TARGET)
    assert "config.json" in files and "README.md" in files
    assert any(name.endswith(".safetensors") for name in files)
    assert json.loads(files["config.json"])["num_local_experts"] == 2
    assert b"https://arxiv.org/abs/2410.08589" in files["README.md"]
    rows = table["value"]["data"] if "value" in table else table["data"]
    assert rows[0][:2] == ["demo_mc", "acc"] and all(cell != "-" for cell in rows[0])
    assert not any(space.tmp.glob("hc-smoe-space-*"))  # the local copy is gone once pushed


def test_signed_in_session_fills_target_and_pushes_with_this_machines_account(space, calib_file):
    cookies = mocked_login(space.url)
    signed_in = client(space.url, httpx_kwargs={"cookies": cookies})
    assert signed_in.predict(SOURCE, "2", "hc-smoe", api_name="/suggest_repo") == TARGET
    assert client(space.url).predict(SOURCE, "2", "hc-smoe", api_name="/suggest_repo") == TARGET.split("/")[1]
    status = status_of(signed_in.predict(**form(calib_file, repo_id="acme/tiny-merged"),
                                         api_name="/merge_and_push"))
    assert "[acme/tiny-merged](" in status, status
    assert "config.json" in space.hub.repo_files("acme/tiny-merged")


@pytest.mark.parametrize(
    ("change", "env", "words"),
    [
        ({}, {}, ["Cannot start", "sign in"]),  # no session, no oauth_token: HF_TOKEN on the server is not used
        ({"source": "upstream/dense"}, {}, ["Cannot start", "llama", "not a supported Mixture-of-Experts"]),
        ({"keep": "9"}, {}, ["Cannot start", "from 1 to 8", "got '9'"]),
        ({"keep": ""}, {}, ["Cannot start", "experts to keep"]),
        ({"num_samples": 0}, {}, ["Cannot start", "Calibration samples"]),
        ({"tasks": ["arc_easy"]}, {"HC_SMOE_MEMORY_LIMIT": "20KB"}, ["Cannot start", "too large", "evaluation tasks"]),
        ({}, {"HC_SMOE_MEMORY_LIMIT": "1KB"}, ["Cannot start", "too large", "merging it"]),
        ({"source": "nobody/missing"}, {}, ["Failed (stage: download)", "not found"]),
        ({"repo_id": "someone-else/x"}, {}, ["Failed (stage: access)", "cannot create repos under"]),
    ],
    ids=["signed-out", "dense", "keep-too-big", "keep-empty", "no-samples", "too-large-eval", "too-large-merge",
         "missing-source", "foreign-namespace"],
)
def test_wrong_input_gives_one_readable_line(space, calib_file, monkeypatch, change, env, words):
    dense = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}
    space.hub.seed_repo("upstream/dense", {"config.json": json.dumps(dense).encode(), "model.safetensors": b"\0" * 64})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    api = client(space.url) if words[1] == "sign in" else client(space.url, oauth_token=ALICE)
    outputs = api.predict(**form(calib_file, **change), api_name="/merge_and_push")
    status = status_of(outputs)
    for word in words:
        assert word.lower() in status.lower().replace("\\", ""), (word, status)
    assert "Traceback" not in status and "Traceback" not in outputs[1]
    assert not space.hub.repo_exists(TARGET)
