"""The base model's licence, carried over to a merged checkpoint: its id from the base card's front matter and
its LICENSE* file, copied next to the merged weights (`inherit_license`), for the card to cite."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard

from hc_smoe_hub.card import CARD_NAME

log = logging.getLogger(__name__)


def _source_card_metadata(src_dir: Path) -> dict[str, Any]:
    readme = Path(src_dir) / CARD_NAME
    if not readme.is_file():
        return {}
    try:
        # A local path: parsed here, no network.
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except (ValueError, OSError, yaml.YAMLError) as exc:
        log.warning("Could not read the front matter of %s (%s); the licence is unknown", readme, exc)
        return {}
    return {key: data.get(key) for key in ("license", "license_name", "license_link")}


def _license_file(src_dir: Path) -> Path | None:
    if not Path(src_dir).is_dir():
        return None
    candidates = [p for p in Path(src_dir).iterdir()
                  if p.is_file() and p.name.lower().startswith(("license", "licence"))]
    candidates.sort(key=lambda p: (p.name != "LICENSE", p.name))  # the conventional name first
    return candidates[0] if candidates else None


def license_from_source(src_dir: Path) -> tuple[str | None, Path | None]:
    """The base card's licence id and its LICENSE* file (whenever one exists, not only for "other")."""
    license_id = _source_card_metadata(src_dir).get("license")
    if isinstance(license_id, list):  # a few cards list several; the Hub shows the first
        license_id = license_id[0] if license_id else None
    path = _license_file(src_dir)
    if license_id == "other" and path is None:
        log.warning("The base model's licence is 'other' but it ships no LICENSE file; see its page")
    return (str(license_id) if license_id else None), path


def inherit_license(src_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Copy the base model's licence file next to the merged checkpoint; return the CardInputs licence fields.

    The file is copied whatever the licence: licences such as Apache-2.0 ask that a copy go with derived
    works, and "other" licences only exist in that file.
    """
    license_id, path = license_from_source(src_dir)
    meta = _source_card_metadata(src_dir)
    copied = False
    name = "LICENSE"
    if path is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out_dir / path.name)
        copied, name = True, path.name
    return {
        "license": license_id,
        "license_file_copied": copied,
        "license_file_name": name,
        "license_name": meta.get("license_name"),
        "license_link": meta.get("license_link"),
    }
