"""The Space's "Retry the push": a failed push keeps its merged checkpoint (hc_smoe_hub/space_keep.py) for a retry.

After a job whose push failed, `after_unfinished` keeps the work folder within the operator's budget and words
the page's message after what really happened to the model (kept, or deleted and why); the kept folder's path
lives in the session's `gr.State` (server side, never sent to the browser) and the retry button pushes it with the
signed-in user's token, in the job slot.

    retry, kept = add_controls()     # inside the page, in app.py's build_demo
    retry.click(retry_push, [kept], [status, retry, kept], concurrency_id="merge", ...)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from hc_smoe_hub import hub, space_keep
from hc_smoe_hub.errors import HcSmoeError
from hc_smoe_hub.pipeline import push_only
from hc_smoe_hub.space_jobs import JobPlan, resolve_user_token

log = logging.getLogger("hc_smoe_space")


def add_controls() -> tuple[gr.Button, gr.State]:
    retry = gr.Button("Retry the push", visible=False, elem_id="retry")
    # The work folder of a failed push kept for `retry`; gradio calls the callback when the session's state goes.
    kept = gr.State(None, delete_callback=space_keep.release)
    return retry, kept


def repo_link(repo_id: str) -> str:
    return f"{hub.hub_endpoint()}/{repo_id}"


def _md_escape(text: str) -> str:
    for ch in "\\`*_{}[]<>()#+!|":
        text = text.replace(ch, "\\" + ch)
    return text


def reason(cause: BaseException) -> str:
    """What failed, without the CLI's advice (a local folder, an hc-smoe-push command) that a Space user can't use."""
    if isinstance(cause, KeyboardInterrupt):
        return "interrupted"
    detail = getattr(cause, "detail", None)
    if detail:
        return str(detail)
    return str(cause) if isinstance(cause, HcSmoeError) else f"{type(cause).__name__}: {cause}"


def after_unfinished(plan: JobPlan, info: dict[str, Any]) -> tuple[str, space_keep.Kept | None]:
    """The page's message after a stage that followed the merge failed, and the kept folder if there is one.

    Only a failed push keeps the checkpoint (it is complete, card and all); after a failed evaluation or card the
    folder is already gone. What the message says about the model's whereabouts is what happened to it.
    """
    head = f"### Failed (stage: {info['stage']})\n\n{_md_escape(info['reason'])}"
    if info["stage"] != "push" or not info.get("repo_id"):
        return f"{head}\n\nThe merged model was not kept on this Space: run the job again.", None
    size = space_keep.dir_bytes(plan.workdir)
    kept = space_keep.keep(plan.workdir, Path(info["folder"]), info["repo_id"], private=plan.job.private,
                           overwrite=plan.job.merge.overwrite)
    if kept is not None:
        return (f"{head}\n\nThe merged model ({size / 1e9:.2f} GB) is kept on this Space: press **Retry the "
                "push** once the cause is fixed. It is deleted when a push succeeds, when you start another job "
                "or leave this page, or when newer failed pushes need the room."), kept
    budget = space_keep.keep_budget()
    if budget == 0:
        why = f"this Space keeps no merged models for a retry ({space_keep.KEEP_ENV} is 0)"
    else:
        why = (f"at {size / 1e9:.2f} GB it is over the {budget / 1e9:.2f} GB this Space keeps for retries "
               f"({space_keep.KEEP_ENV})")
    return f"{head}\n\nThe merged model was deleted: {why}. Run the job again once the cause is fixed.", None


def retry_push(kept_dir: str | None, oauth_token: gr.OAuthToken | None) -> Iterator[tuple]:
    """The "Retry the push" handler: pushes the kept checkpoint again; yields (status, retry button, kept folder)."""
    kept = space_keep.load(kept_dir)
    if kept is None:
        yield ("### Nothing to retry\n\nThe merged model is no longer on this Space (it made room for newer failed "
               "pushes, or the app restarted): run the job again.", gr.Button(visible=False), None)
        return
    try:
        token = resolve_user_token(oauth_token)
    except HcSmoeError as exc:
        yield f"### Cannot retry\n\n{_md_escape(str(exc))}", gr.Button(interactive=True), gr.skip()
        return
    yield f"### Pushing the kept model to {_md_escape(kept.repo_id)} again…", gr.Button(interactive=False), gr.skip()
    try:
        push_only(Path(kept.folder), kept.repo_id, token, kept.private, kept.overwrite)
    except Exception as exc:
        if not isinstance(exc, HcSmoeError):
            log.exception("retrying the push failed")
        yield (f"### The push failed again\n\n{_md_escape(reason(exc))}\n\nThe merged model is still kept on "
               "this Space: press **Retry the push** to try once more.", gr.Button(interactive=True), gr.skip())
        return
    space_keep.release(kept.workdir)
    yield (f"### Pushed to [{kept.repo_id}]({repo_link(kept.repo_id)})\n\nThe kept merged model, on retry.",
           gr.Button(visible=False), None)
