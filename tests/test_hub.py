"""hc_smoe_hub.hub against a loopback Hub, driven by the real huggingface_hub client (no client mocks).

Each test gets a fresh `LoopbackHub` on 127.0.0.1, a temporary HF_HOME / cache / token path, HF_HUB_OFFLINE
cleared, and an HTTP client whose only addition is a guard that fails the test if any request leaves the
loopback host (huggingface_hub would otherwise fetch its agent registry from huggingface.co, for example).
`HF_HUB_DISABLE_XET=1` is set: the loopback Hub serves Git LFS (batch API, basic transfer) for weights, as the
Hub does for clients without Xet, but cannot serve Xet storage.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx2
import pytest
from hub_server import LoopbackHub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http

from hc_smoe_hub import hub as hubmod
from hc_smoe_hub.errors import HubAccessError, SourceError

ALICE = "hf_alice_write_0123456789"  # write token; member of acme (write) and readers (read)
BOB = "hf_bob_read_0123456789"  # read-only token
CAROL_FG = "hf_carol_finegrained_0123"  # fine-grained: repo.write on carol only
CAROL_FG_ORG = "hf_carol_finegrained_org"  # fine-grained: repo.write on acme only
ALL_TOKENS = (ALICE, BOB, CAROL_FG, CAROL_FG_ORG)

SAFETENSORS_STUB = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # header length + empty JSON header


def _loopback_only_client() -> httpx2.Client:
    client = _http.default_client_factory()

    def refuse_other_hosts(request: httpx2.Request) -> None:
        if request.url.host != "127.0.0.1":
            raise AssertionError(f"request left the loopback hub: {request.method} {request.url}")

    client.event_hooks = {"request": [*client.event_hooks["request"], refuse_other_hosts], "response": []}
    return client


@pytest.fixture()
def hf_env(monkeypatch, tmp_path):
    """Isolated huggingface_hub state: nothing read from or written to the user's HF_HOME, online mode."""
    home = tmp_path / "hf_home"
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_XET_CACHE", str(home / "xet"))
    # huggingface_hub froze these at import time: patch the module attributes it reads at call time.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(home / "xet"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # Weights take the LFS path (Xet cannot be served locally); the variable also reaches subprocesses.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    _http.set_client_factory(_loopback_only_client)
    yield home
    _http.set_client_factory(_http.default_client_factory)


@pytest.fixture()
def hub(hf_env, monkeypatch):
    with LoopbackHub() as server:
        server.add_user("alice", ALICE, orgs={"acme": "write", "readers": "read"})
        server.add_user("bob", BOB, can_write=False)
        server.add_user("carol", "hf_carol_classic", orgs=("acme",))
        server.add_token(
            "carol", CAROL_FG, role="fineGrained", scoped={"carol": ["repo.content.read", "repo.write"]}
        )
        server.add_token("carol", CAROL_FG_ORG, role="fineGrained", scoped={"acme": ["repo.write"]})
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """A small checkpoint-like folder: configs, a nested binary > 1 MB, a card with front matter."""
    folder = tmp_path / "merged"
    (folder / "extra").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "mixtral", "num_local_experts": 4}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: upstream/tiny\n---\n# merged\n")
    (folder / "model.safetensors").write_bytes(SAFETENSORS_STUB + os.urandom(1_300_000))
    (folder / "extra" / "notes.txt").write_text("hello")
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _no_secret(text: str) -> None:
    for token in ALL_TOKENS:
        assert token not in text


# ---------------------------------------------------------------------------- the server, raw client


def test_whoami_gives_user_orgs_and_token_role(hub):
    api = HfApi(endpoint=hub.endpoint)
    alice = api.whoami(token=ALICE)
    assert alice["name"] == "alice"
    assert {o["name"]: o["roleInOrg"] for o in alice["orgs"]} == {"acme": "write", "readers": "read"}
    assert alice["auth"]["accessToken"]["role"] == "write"
    assert api.whoami(token=BOB)["auth"]["accessToken"]["role"] == "read"
    fine = api.whoami(token=CAROL_FG)["auth"]["accessToken"]
    assert fine["role"] == "fineGrained"
    assert fine["fineGrained"]["scoped"][0]["entity"] == {
        "_id": fine["fineGrained"]["scoped"][0]["entity"]["_id"],
        "type": "user",
        "name": "carol",
    }
    with pytest.raises(HfHubHTTPError) as err:
        api.whoami(token="hf_not_a_token")
    assert err.value.response.status_code == 401


def test_create_repo_conflict_permissions_and_privacy(hub):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    url = api.create_repo("alice/new", private=True)
    assert url.repo_id == "alice/new" and url.endpoint == hub.endpoint
    assert hub.repo_files("alice/new") == {".gitattributes": hub_server_gitattributes()}
    assert hub.repo_private("alice/new")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/new")
    assert err.value.response.status_code == 409
    assert api.create_repo("alice/new", exist_ok=True).repo_id == "alice/new"
    api.create_repo("acme/team-model")  # org where alice may write

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("bob/not-yours")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token=BOB).create_repo("bob/read-only-token")
    assert err.value.response.status_code == 403
    # A private repo is invisible to others, exactly like a missing one.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=BOB).model_info("alice/new")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("alice/new")


def hub_server_gitattributes() -> bytes:
    from hub_server import DEFAULT_GITATTRIBUTES

    return DEFAULT_GITATTRIBUTES


def test_upload_folder_takes_the_lfs_path_and_downloads_back_identical(hub, model_dir, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/roundtrip")
    info = api.upload_folder(repo_id="alice/roundtrip", folder_path=model_dir, commit_message="Add model")
    assert info.oid == hub.head("alice/roundtrip")
    assert hub.repo_files("alice/roundtrip") == {
        ".gitattributes": hub_server_gitattributes(),
        **_tree(model_dir),
    }
    assert hub.commit_titles("alice/roundtrip") == ["Add model", "initial commit"]
    # The shard went through the LFS batch API, a PUT to the storage origin and verify; the rest inline.
    assert hub.lfs_paths("alice/roundtrip") == {"model.safetensors"}
    pushed = [(m, p.split("/upload/")[0]) for m, p in hub.requests]
    batch = pushed.index(("POST", "/alice/roundtrip.git/info/lfs/objects/batch"))
    assert pushed[batch + 1 : batch + 3] == [
        ("PUT", "/lfs-storage"),
        ("POST", "/alice/roundtrip.git/info/lfs/objects/verify"),
    ]
    assert pushed[batch + 3] == ("POST", "/api/models/alice/roundtrip/commit/main")

    assert sorted(api.list_repo_files("alice/roundtrip")) == sorted([".gitattributes", *_tree(model_dir)])
    top = {e.path: e for e in api.list_repo_tree("alice/roundtrip")}
    assert type(top["extra"]).__name__ == "RepoFolder" and "extra/notes.txt" not in top
    shard = (model_dir / "model.safetensors").read_bytes()
    assert top["model.safetensors"].lfs.size == len(shard) and top["config.json"].lfs is None
    assert [e.path for e in api.list_repo_tree("alice/roundtrip", path_in_repo="extra")] == ["extra/notes.txt"]

    before = len(hub.requests)
    local = Path(
        snapshot_download(
            "alice/roundtrip", token=ALICE, endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache")
        )
    )
    assert local.name == info.oid
    assert {k: v for k, v in _tree(local).items() if k != ".gitattributes"} == _tree(model_dir)
    # The shard's bytes came from the LFS storage origin the /resolve redirect pointed at, not from the repo.
    assert [m for m, p in hub.requests[before:] if p.startswith("/lfs-storage/objects/")] == ["GET"]
    assert not [p for _, p in hub.requests if "xet" in p]

    # Unchanged re-upload: the preupload `oid`s (sha256 for LFS) let the client skip every file: no commit.
    api.upload_folder(repo_id="alice/roundtrip", folder_path=model_dir, commit_message="again")
    assert hub.head("alice/roundtrip") == info.oid


def test_lfs_shortcuts_are_refused(hub):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/strict")
    auth = {"Authorization": f"Bearer {ALICE}"}
    commit = f"{hub.endpoint}/api/models/alice/strict/commit/main"

    def ndjson(*lines: dict) -> bytes:
        import json

        return "\n".join(json.dumps(x) for x in ({"key": "header", "value": {"summary": "x"}}, *lines)).encode()

    never_uploaded = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64}}
    answer = httpx2.post(commit, content=ndjson(never_uploaded), headers=auth)
    assert answer.status_code == 400 and "LFS batch API" in answer.json()["error"]
    inline = {"key": "file", "value": {"path": "w.safetensors", "encoding": "base64", "content": "AAAA"}}
    answer = httpx2.post(commit, content=ndjson(inline), headers=auth)
    assert answer.status_code == 400 and "through LFS" in answer.json()["error"]
    batch = httpx2.post(
        f"{hub.endpoint}/alice/strict.git/info/lfs/objects/batch",
        json={"operation": "upload", "transfers": ["basic"], "objects": [{"oid": "a" * 64, "size": 3}]},
        headers=auth,
    ).json()
    upload = batch["objects"][0]["actions"]["upload"]["href"]
    assert not upload.startswith(hub.endpoint)  # another origin, as the Hub's object storage is
    assert httpx2.put(upload, content=b"abc").status_code == 400  # content that does not hash to the oid
    assert hub.commit_titles("alice/strict") == ["initial commit"]


def test_with_xet_the_client_pipelines_regular_files_and_is_told_xet_is_not_served(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # hf_xet is installed: upload_folder pipelines
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/xet")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "config.json").write_text("{}")
    (texts / "README.md").write_text("# hi\n")
    api.upload_folder(repo_id="alice/xet", folder_path=texts, commit_message="texts")
    assert set(hub.repo_files("alice/xet")) == {".gitattributes", "config.json", "README.md"}
    (texts / "model.safetensors").write_bytes(SAFETENSORS_STUB)
    # hf_xet asks for a write token, which the loopback Hub refuses with 501 (Xet storage is not served).
    with pytest.raises(ConnectionError, match="501 Not Implemented"):
        api.upload_folder(repo_id="alice/xet", folder_path=texts, commit_message="weights")
    assert ("GET", "/api/models/alice/xet/xet-write-token/main") in hub.requests
    assert "model.safetensors" not in hub.repo_files("alice/xet")


def test_tree_listing_follows_pagination(hf_env):
    with LoopbackHub(tree_page_size=2) as server:
        server.add_user("alice", ALICE)
        files = {f"f{i}.json": b"{}" for i in range(5)}
        server.seed_repo("alice/many", files)
        listed = HfApi(endpoint=server.endpoint, token=ALICE).list_repo_files("alice/many")
        assert sorted(listed) == sorted([".gitattributes", *files])
        assert sum(1 for _, p in server.requests if "/tree/" in p) == 3


def test_resolve_head_headers_and_error_codes(hub):
    sha = hub.seed_repo("upstream/tiny", {"config.json": b'{"a": 1}'})
    url = f"{hub.endpoint}/upstream/tiny/resolve/main/config.json"
    head = httpx2.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["X-Repo-Commit"] == sha
    assert head.headers["Content-Length"] == "8" and head.headers["ETag"].startswith('"')
    assert httpx2.get(url, headers={"Range": "bytes=1-3"}).content == b'"a"'

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("upstream/tiny", "missing.json", endpoint=hub.endpoint, token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("upstream/tiny", "config.json", revision="nope", endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("upstream/absent", "config.json", endpoint=hub.endpoint, token=False)
    hub.seed_repo("upstream/gated", {"config.json": b"{}"}, gated=True)
    with pytest.raises(GatedRepoError):
        hf_hub_download("upstream/gated", "config.json", endpoint=hub.endpoint, token=BOB)
    hub.grant_access("upstream/gated", "bob")
    path = hf_hub_download("upstream/gated", "config.json", endpoint=hub.endpoint, token=BOB)
    assert Path(path).read_bytes() == b"{}"


def test_server_never_logs_tokens(hub, caplog, model_dir):
    caplog.set_level(logging.DEBUG)
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/logged")
    api.upload_folder(repo_id="alice/logged", folder_path=model_dir, commit_message="x")
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.endpoint, token=BOB).create_repo("bob/nope")
    assert "/api/repos/create" in caplog.text  # the server did log its requests
    _no_secret(caplog.text)


# ---------------------------------------------------------------------------- check_push_access


def test_check_push_access_defaults_to_user_namespace(hub):
    assert (
        hubmod.check_push_access(None, token=ALICE, default_name="tiny-4e", overwrite=False, private=False)
        == "alice/tiny-4e"
    )
    assert (
        hubmod.check_push_access("bare-name", token=ALICE, default_name="x", overwrite=False, private=True)
        == "alice/bare-name"
    )
    assert (
        hubmod.check_push_access(
            "acme/tiny-4e", token=ALICE, default_name="x", overwrite=False, private=False
        )
        == "acme/tiny-4e"
    )


def test_check_push_access_reads_hf_token_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert hubmod.resolve_token(None) == ALICE
    assert hubmod.resolve_token("explicit") == "explicit"
    assert (
        hubmod.check_push_access(None, token=None, default_name="m", overwrite=False, private=False)
        == "alice/m"
    )


def test_check_push_access_without_token(hub):
    assert hubmod.resolve_token(None) is None
    with pytest.raises(HubAccessError) as err:
        hubmod.check_push_access(None, token=None, default_name="m", overwrite=False, private=False)
    assert str(err.value) == (
        "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)"
    )


@pytest.mark.parametrize(
    ("token", "repo_id", "expected"),
    [
        ("hf_invalid_token_123", None, "rejected"),
        (BOB, None, "read-only"),
        (ALICE, "bob/stolen", "cannot create repos under 'bob'"),
        (ALICE, "readers/model", "only read access in the organisation readers"),
        (CAROL_FG, "acme/model", "fine-grained token of carol cannot write to acme"),
        (CAROL_FG_ORG, None, "fine-grained token of carol cannot write to carol"),
        (ALICE, "alice/bad name!", "not a valid Hub repo id"),
    ],
    ids=[
        "invalid-token",
        "read-only",
        "foreign-namespace",
        "read-org",
        "fine-grained-ns",
        "fine-grained-user",
        "bad-id",
    ],
)
def test_check_push_access_refusals(hub, token, repo_id, expected):
    with pytest.raises(HubAccessError) as err:
        hubmod.check_push_access(repo_id, token=token, default_name="m", overwrite=False, private=False)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)
    _no_secret(str(err.value))
    assert "hf_invalid_token_123" not in str(err.value)


def test_check_push_access_fine_grained_write_is_accepted(hub):
    assert (
        hubmod.check_push_access(None, token=CAROL_FG, default_name="m", overwrite=False, private=False)
        == "carol/m"
    )
    assert (
        hubmod.check_push_access(
            "acme/m", token=CAROL_FG_ORG, default_name="x", overwrite=False, private=False
        )
        == "acme/m"
    )


def test_check_push_access_non_empty_target_needs_overwrite(hub):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/empty")  # holds only .gitattributes: still empty
    assert (
        hubmod.check_push_access("alice/empty", token=ALICE, default_name="x", overwrite=False, private=False)
        == "alice/empty"
    )
    hub.seed_repo("alice/full", {"config.json": b"{}", "model.safetensors": SAFETENSORS_STUB})
    with pytest.raises(HubAccessError) as err:
        hubmod.check_push_access("alice/full", token=ALICE, default_name="x", overwrite=False, private=False)
    assert "--overwrite" in str(err.value) and "alice/full" in str(err.value)
    assert (
        hubmod.check_push_access("alice/full", token=ALICE, default_name="x", overwrite=True, private=False)
        == "alice/full"
    )


def test_check_push_access_unreachable_hub(hf_env, monkeypatch):
    with LoopbackHub() as server:
        endpoint = server.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # nothing listens there any more
    with pytest.raises(HubAccessError) as err:
        hubmod.check_push_access(None, token=ALICE, default_name="m", overwrite=False, private=False)
    assert "cannot reach" in str(err.value)
    _no_secret(str(err.value))


# ---------------------------------------------------------------------------- download_source


def _seed_source(hub: LoopbackHub, repo_id: str = "upstream/tiny-moe", **kwargs) -> str:
    return hub.seed_repo(
        repo_id,
        {
            "config.json": b'{"model_type": "mixtral"}',
            "generation_config.json": b"{}",
            "model-00001-of-00002.safetensors": SAFETENSORS_STUB + b"a" * 64,
            "model-00002-of-00002.safetensors": SAFETENSORS_STUB + b"b" * 64,
            "model.safetensors.index.json": b'{"weight_map": {}}',
            "tokenizer.json": b"{}",
            "tokenizer_config.json": b"{}",
            "tokenizer.model": b"sp",
            "chat_template.jinja": b"{{ messages }}",
            "LICENSE": b"Apache-2.0",
            "README.md": b"---\nlicense: apache-2.0\n---\n",
            "modeling_tiny.py": b"raise SystemExit",
            "pytorch_model.bin": b"pickle",
            "original/consolidated.pth": b"pickle",
        },
        **kwargs,
    )


def test_download_source_fetches_only_what_the_engine_reads(hub, tmp_path):
    sha = _seed_source(hub)
    local, got_sha = hubmod.download_source(
        "upstream/tiny-moe", revision=None, token=None, cache_dir=str(tmp_path / "cache"), progress=False
    )
    assert got_sha == sha and local.name == sha
    expected = {
        k: v
        for k, v in hub.repo_files("upstream/tiny-moe").items()
        if not k.endswith((".py", ".bin", ".pth")) and k != ".gitattributes"
    }
    assert _tree(local) == expected


def test_download_source_pins_the_revision(hub, tmp_path):
    first = _seed_source(hub)
    hub.seed_repo("upstream/tiny-moe", {"config.json": b'{"model_type": "mixtral", "v": 2}'})
    local, sha = hubmod.download_source(
        "upstream/tiny-moe", revision=first, token=None, cache_dir=str(tmp_path / "cache"), progress=False
    )
    assert sha == first and (local / "config.json").read_bytes() == b'{"model_type": "mixtral"}'


@pytest.mark.parametrize(
    ("repo_id", "token", "revision", "expected"),
    [
        ("upstream/absent", None, None, "model repo upstream/absent not found on the Hub (or it is private"),
        ("alice/secret", BOB, None, "model repo alice/secret not found on the Hub (or it is private"),
        ("upstream/gated", BOB, None, "upstream/gated is gated: accept its licence on"),
        ("upstream/gated", None, None, "upstream/gated is gated"),
        (
            "upstream/pickled",
            None,
            None,
            "has only pickle weights (pytorch_model.bin); convert it to safetensors",
        ),
        ("upstream/tiny-moe", None, "v9", "revision 'v9' not found in upstream/tiny-moe"),
    ],
    ids=["missing", "private", "gated", "gated-anonymous", "pickle-only", "bad-revision"],
)
def test_download_source_refusals(hub, tmp_path, repo_id, token, revision, expected):
    _seed_source(hub)
    _seed_source(hub, "alice/secret", private=True)
    _seed_source(hub, "upstream/gated", gated=True)
    hub.seed_repo("upstream/pickled", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    with pytest.raises(SourceError) as err:
        hubmod.download_source(
            repo_id, revision=revision, token=token, cache_dir=str(tmp_path / "c"), progress=False
        )
    assert expected in str(err.value)
    _no_secret(str(err.value))
    if repo_id == "upstream/pickled":  # refused from the listing, before any file was fetched
        assert not [p for _, p in hub.requests if "/resolve/" in p]


def test_download_source_gated_with_access(hub, tmp_path):
    _seed_source(hub, "upstream/gated", gated=True)
    hub.grant_access("upstream/gated", "bob")
    local, _ = hubmod.download_source(
        "upstream/gated", revision=None, token=BOB, cache_dir=str(tmp_path / "c"), progress=False
    )
    assert (local / "config.json").is_file()


def test_download_source_offline_and_unreachable(hf_env, monkeypatch, tmp_path):
    with LoopbackHub() as server:
        endpoint = server.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(SourceError) as err:
        hubmod.download_source(
            "upstream/x", revision=None, token=None, cache_dir=str(tmp_path), progress=False
        )
    assert f"cannot reach {endpoint}" in str(err.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as err:
        hubmod.download_source(
            "upstream/x", revision=None, token=None, cache_dir=str(tmp_path), progress=False
        )
    assert "HF_HUB_OFFLINE is set" in str(err.value)


# ---------------------------------------------------------------------------- push_folder


def test_push_folder_creates_repo_and_uploads(hub, model_dir):
    url = hubmod.push_folder(
        model_dir, "alice/tiny-4e", token=ALICE, private=True, commit_message="Add HC-SMoE merge"
    )
    assert url == f"{hub.endpoint}/alice/tiny-4e"
    assert hub.repo_private("alice/tiny-4e")
    assert hub.repo_files("alice/tiny-4e") == {
        ".gitattributes": hub_server_gitattributes(),
        **_tree(model_dir),
    }
    assert hub.commit_titles("alice/tiny-4e")[0] == "Add HC-SMoE merge"


def test_push_folder_deletes_stale_files_only_when_asked(hub, model_dir):
    hub.seed_repo("alice/old", {"model-00001-of-00009.safetensors": b"old", "config.json": b"{}"})
    hubmod.push_folder(model_dir, "alice/old", token=ALICE, private=False, commit_message="add")
    assert set(hub.repo_files("alice/old")) == {
        ".gitattributes",
        "model-00001-of-00009.safetensors",
        *_tree(model_dir),
    }
    hubmod.push_folder(
        model_dir, "alice/old", token=ALICE, private=False, commit_message="replace", delete_stale=True
    )
    assert hub.repo_files("alice/old") == {".gitattributes": hub_server_gitattributes(), **_tree(model_dir)}
    assert hub.commit_titles("alice/old")[:2] == ["replace", "add"]


def test_push_folder_retries_transient_errors(hub, model_dir):
    hub.fail_next("POST", r"^/api/repos/create$", status=503, times=2)
    hubmod.push_folder(model_dir, "alice/flaky", token=ALICE, private=False, commit_message="m", backoff_s=0)
    assert sum(1 for m, p in hub.requests if (m, p) == ("POST", "/api/repos/create")) == 3
    assert set(hub.repo_files("alice/flaky")) == {".gitattributes", *_tree(model_dir)}


def test_push_folder_gives_up_with_a_resume_command(hub, model_dir):
    hub.fail_next("POST", r"^/api/repos/create$", status=502, times=100)
    with pytest.raises(HubAccessError) as err:
        hubmod.push_folder(
            model_dir, "alice/down", token=ALICE, private=False, commit_message="m", retries=2, backoff_s=0
        )
    message = str(err.value)
    assert f"hc-smoe-push --push-only {model_dir} --repo-id alice/down" in message
    assert "failed 3 times" in message and "HTTP 502" in message
    _no_secret(message)


def test_push_folder_permission_errors_are_not_retried(hub, model_dir):
    with pytest.raises(HubAccessError) as err:
        hubmod.push_folder(model_dir, "bob/model", token=BOB, private=False, commit_message="m", backoff_s=0)
    assert "HTTP 403" in str(err.value) and "--push-only" in str(err.value)
    assert sum(1 for m, p in hub.requests if (m, p) == ("POST", "/api/repos/create")) == 1
    _no_secret(str(err.value))
    with pytest.raises(HubAccessError) as err:
        hubmod.push_folder(model_dir, "alice/m", token=None, private=False, commit_message="m")
    assert str(err.value).startswith("no Hugging Face token")
