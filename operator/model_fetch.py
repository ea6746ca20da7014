"""`neo fetch-model`: download an ``hf://org/name[@revision]`` model with ``huggingface_hub``.

It runs in the pods the operator builds (``neo_operator.model_source``), not in the operator: as the
engine pod's ``model-download`` init container (the whole snapshot into the model cache volume) and
as the model-inspection Job (``--config-only``: config.json alone, before anything is sized). The
token comes from ``HF_TOKEN`` and the endpoint from ``HF_ENDPOINT`` (the container's env, from the
spec), as ``huggingface_hub`` reads them.

Its one line of JSON goes to ``--message-file`` (the container's termination-message file, which
the kubelet copies into the pod status, where the operator reads it): on success the commit the
revision resolved to and the geometry read from config.json; on failure a reason (``FetchFailure``)
and the Hub's answer. Imports neither kopf nor the kubernetes client: the engine images run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import re
import sys
from typing import Any

# The kubelet keeps at most 4096 bytes of a termination message; the Hub's answer is cut to leave
# room for the rest.
MAX_DETAIL = 1500
HF_SCHEME = "hf://"
# What the Hub accepts as a repo id (namespace/name) and a revision (branch, tag or commit).
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]{1,255}$")
DEFAULT_REVISION = "main"


class FetchFailure(str, enum.Enum):
    """Why a fetch failed, as the condition reason the operator reports."""

    UNAUTHORIZED = "HubUnauthorized"  # 401/403: no token, a wrong one, or one without access (gated)
    REPO_NOT_FOUND = "RepoNotFound"
    REVISION_NOT_FOUND = "RevisionNotFound"
    UNSUPPORTED = "ModelUnsupported"  # config.json missing or an architecture the engine does not serve
    UNREACHABLE = "HubUnreachable"  # connection refused, timeouts, 5xx


@dataclasses.dataclass(frozen=True)
class HubRef:
    """``hf://org/name[@revision]`` parsed: the repo id and the revision (a branch, tag or commit)."""

    repo_id: str
    revision: str = DEFAULT_REVISION

    @classmethod
    def parse(cls, uri: str) -> "HubRef":
        if not uri.startswith(HF_SCHEME):
            raise ValueError(f"{uri!r} does not start with {HF_SCHEME}")
        repo, _, revision = uri[len(HF_SCHEME):].partition("@")
        if not _REPO.match(repo):
            raise ValueError(f"{uri!r}: {repo!r} is not a Hub repo id (org/name: letters, digits, '.', '_', '-')")
        if revision and not _REVISION.match(revision):
            raise ValueError(f"{uri!r}: {revision!r} is not a revision (a branch, tag or commit)")
        return cls(repo, revision or DEFAULT_REVISION)

    @property
    def uri(self) -> str:
        return f"{HF_SCHEME}{self.repo_id}@{self.revision}"


def _failure(exc: BaseException) -> FetchFailure:
    from huggingface_hub import errors

    if isinstance(exc, errors.RevisionNotFoundError):
        return FetchFailure.REVISION_NOT_FOUND
    if isinstance(exc, errors.GatedRepoError):
        return FetchFailure.UNAUTHORIZED
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return FetchFailure.UNAUTHORIZED
    if isinstance(exc, errors.RepositoryNotFoundError) or status == 404:
        return FetchFailure.REPO_NOT_FOUND
    return FetchFailure.UNREACHABLE


def fetch(ref: HubRef, target: str, config_only: bool = False) -> dict[str, Any]:
    """Download ``ref`` into ``target`` (config.json alone with ``config_only``); returns the result
    line (``{"revision", "geometry"}`` or ``{"reason", "detail"}``)."""
    from huggingface_hub import HfApi, snapshot_download

    from neo_common.model_source import geometry_from_hf_config

    try:
        # Resolve the revision first: the download is then pinned to that commit (and so is every
        # replica, since the operator hands the commit to the pods' init containers).
        commit = HfApi().model_info(ref.repo_id, revision=ref.revision).sha or ref.revision
        path = snapshot_download(ref.repo_id, revision=commit, local_dir=target,
                                 allow_patterns=["config.json"] if config_only else None)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reason the operator reports
        return {"reason": _failure(exc).value, "detail": f"{type(exc).__name__}: {exc}"[:MAX_DETAIL]}
    try:
        with open(os.path.join(path, "config.json")) as f:
            geometry = geometry_from_hf_config(json.load(f), ref.repo_id)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"reason": FetchFailure.UNSUPPORTED.value, "detail": f"config.json of {ref.repo_id}@{commit}: "
                f"{type(exc).__name__}: {exc}"[:MAX_DETAIL], "revision": commit}
    return {"revision": commit, "geometry": geometry.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neo fetch-model", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="hf://org/name[@revision]")
    parser.add_argument("--dir", required=True, help="folder to download into")
    parser.add_argument("--config-only", action="store_true", help="download config.json alone")
    parser.add_argument("--message-file", default="", help="where the result line goes (default: stdout)")
    args = parser.parse_args(argv)
    try:
        result = fetch(HubRef.parse(args.source), args.dir, args.config_only)
    except ValueError as exc:
        result = {"reason": FetchFailure.REPO_NOT_FOUND.value, "detail": str(exc)}
    line = json.dumps(result, separators=(",", ":"))
    if args.message_file:
        with open(args.message_file, "w") as f:
            f.write(line)
    sys.stdout.write(line + "\n")
    if "reason" in result:
        sys.stderr.write(f"neo fetch-model {args.source}: {result['reason']}: {result['detail']}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
