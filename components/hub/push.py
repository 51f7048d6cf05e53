"""`medtune push RUN_DIR --repo-id ORG/NAME [--adapter-only | --merged] [--private] [--replace] [--dry-run]`.

Publishes one run of a study to the Hugging Face Hub: the merged model (safetensors, config,
tokenizer) or, with ``--adapter-only``, the PEFT adapter (with the tokenizer), and a model card.
Everything is checked and built locally first; then the repository is created if needed and all
files go up in one commit (`HfApi.create_commit`), so a failure part-way publishes nothing.
Files already in the repository that this push does not write (an adapter_config.json left by
an earlier adapter push makes loaders treat a merged model as an adapter) are named in a
warning; ``--replace`` deletes them in the same commit.

The token is whatever huggingface_hub finds (``HF_TOKEN``, or the login of ``hf auth login``);
this module never passes, prints or stores it, and removes anything token-like from the error
messages it prints. ``--dry-run`` needs neither a token nor the network.
"""

import argparse
import re
import sys
from typing import TYPE_CHECKING, List, Optional

from components.hub.checkpoint import PushError, Upload, adapter_files, merged_files

if TYPE_CHECKING:  # the run and card modules import torch: push() and plan() import them, not medtune --help
    from components.hub.run import RunInfo

_SECRET = re.compile(r"hf_[A-Za-z0-9]{6,}|(?i:bearer)\s+\S+")


def redact(text: str, token: Optional[str]) -> str:
    """`text` without the token, nor anything shaped like a Hub token or an Authorization value."""
    if token:
        text = text.replace(token, "***")
    return _SECRET.sub("***", text)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"--repo-id {repo_id!r}: {error}") from None
    if repo_id.count("/") != 1:
        raise PushError(f"--repo-id {repo_id!r}: expected ORG/NAME (a user or organization, then the model's name)")


def plan(
    info: "RunInfo", repo_id: str, adapter: bool, base_model: Optional[str] = None, datasets: Optional[List[str]] = None
) -> List[Upload]:
    """Every file of the commit, the model card (README.md) first; raises `PushError` if incomplete."""
    from components.hub.model_card import base_model_id, build_card, training_datasets

    base_model = base_model or base_model_id(info.config)
    datasets = list(dict.fromkeys([*training_datasets(info.config), *(datasets or [])]))
    if adapter:
        if info.adapter_dir is None:
            raise PushError(
                f"{info.run_dir} has no PEFT adapter for {info.merged_dir.name} (only LoRA, QLoRA and KnowTuning "
                "runs write one): push the merged model instead (leave out --adapter-only)"
            )
        files = adapter_files(info.adapter_dir, info.tokenizer_dir, base_model)
    else:
        files = merged_files(info.merged_dir)
    card = build_card(info, repo_id, adapter, base_model, datasets)
    return [Upload("README.md", data=str(card).encode("utf-8"), note="the model card, printed below"), *files]


def describe(uploads: List[Upload]) -> List[str]:
    """One line per file (path in the repository, size in bytes, where it comes from), then the total."""
    width = max(len(u.path_in_repo) for u in uploads)
    lines = []
    for upload in uploads:
        origin = upload.note or str(upload.source)
        lines.append(f"  {upload.path_in_repo:<{width}}  {upload.size:>15,} B  {origin}")
    lines.append(f"  {len(uploads)} files, {sum(u.size for u in uploads):,} bytes")
    return lines


#: Files of a repository that a push never counts as stale: the Hub writes .gitattributes itself.
KEEP_IN_REPO = frozenset({".gitattributes"})


def upload(repo_id: str, uploads: List[Upload], private: bool, message: str, replace: bool = False) -> int:
    """Create the repository if needed and add every file in one commit (with ``replace``, also
    delete the repository's other files in it); report what happened."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        print("medtune push: huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): "
              "unset it to push (or use --dry-run); nothing was uploaded", file=sys.stderr)
        return 2
    try:
        token = get_token()
    except Exception as error:  # e.g. a failed OIDC exchange; its text may hold secrets
        print(f"medtune push: no Hugging Face token: {redact(str(error), None)}; nothing was uploaded", file=sys.stderr)
        return 2
    if not token:
        print("medtune push: no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded",
              file=sys.stderr)
        return 2
    api = HfApi()  # huggingface_hub finds the token itself; it is never handed around here
    stage, state = "reading the files", "No file was uploaded."
    try:
        operations = [
            CommitOperationAdd(u.path_in_repo, u.data if u.data is not None else str(u.source)) for u in uploads
        ]
        stage = f"creating the repository {repo_id}"
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        stage = f"listing the files of {repo_id}"
        pushed = {u.path_in_repo for u in uploads}
        stale = sorted(set(api.list_repo_files(repo_id)) - pushed - KEEP_IN_REPO)
        if stale and replace:
            operations += [CommitOperationDelete(path) for path in stale]
            print(f"deleting {len(stale)} files of {repo_id} that this push does not write: {', '.join(stale)}")
        elif stale:
            print(f"warning: {repo_id} keeps {len(stale)} files that this push does not write: {', '.join(stale)}; "
                  "--replace deletes them in the same commit", file=sys.stderr)
        stage = f"uploading {len(uploads)} files ({sum(u.size for u in uploads):,} bytes) to {repo_id}"
        state = (
            f"The repository {repo_id} exists, but this push made no commit to it: the files go up in a single "
            "commit, so none of them was published (after a timeout, check its history on the Hub). "
            "Run the same command again to retry."
        )
        commit = api.create_commit(repo_id, operations, commit_message=message)
    except (Exception, KeyboardInterrupt) as error:
        reason = redact(f"{type(error).__name__}: {error}", token)
        print(f"medtune push: FAILED while {stage}: {reason}\n{state}", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 1
    print(f"pushed {len(uploads)} files to {commit.repo_url} (commit {commit.oid[:12]}): {commit.commit_url}")
    return 0


def push(
    run_dir: str,
    repo_id: str,
    adapter_only: bool = False,
    merged: bool = False,
    private: bool = False,
    dry_run: bool = False,
    replace: bool = False,
    base_model: Optional[str] = None,
    datasets: Optional[List[str]] = None,
) -> int:
    """Check, describe and (unless `dry_run`) upload a run; the exit code of `medtune push`."""
    from components.hub.run import load_run

    try:
        check_repo_id(repo_id)
        info = load_run(run_dir)
        adapter = adapter_only or (info.named_adapter and not merged)
        uploads = plan(info, repo_id, adapter, base_model, datasets)
    except PushError as error:
        print(f"medtune push: {error}", file=sys.stderr)
        return 2
    for note in info.notes:
        print(f"note: {note}", file=sys.stderr)
    kind = "PEFT adapter" if adapter else "merged model"
    visibility = "private" if private else "visibility: the account's default"
    source = info.adapter_dir if adapter else info.merged_dir
    header = f"{kind} of {source} -> {repo_id} ({visibility}), one commit of:"
    if dry_run:
        print("\n".join([f"dry run, nothing is uploaded: {header}", *describe(uploads), "", "----- README.md -----"]))
        print(uploads[0].data.decode("utf-8"))
        return 0
    print("\n".join([header, *describe(uploads)]), flush=True)
    study = f" of study {info.study['study']}" if info.study.get("study") else ""
    message = f"medtune push: {kind}, run {info.name}{study} ({info.merged_dir.name})"
    return upload(repo_id, uploads, private, message, replace)


def add_push_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("push", help="publish a run's checkpoint and model card to the Hugging Face Hub")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run of a study, e.g. outputs/study/quickstart/runs/lora, or a checkpoint folder in it "
                             "(epoch_N, adapter/epoch_N) for an epoch other than the last")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the model repository (created if needed)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--adapter-only", action="store_true",
                      help="push the PEFT adapter (LoRA, QLoRA, KnowTuning runs)")
    what.add_argument("--merged", action="store_true", help="push the merged full model (the default)")
    parser.add_argument("--private", action="store_true",
                        help="create the repository as private (an existing one keeps its visibility)")
    parser.add_argument("--replace", action="store_true",
                        help="delete the repository's files that this push does not write, in the same commit "
                             "(without it they stay, with a warning)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the files and print the card; no token, no network")
    parser.add_argument("--base-model", metavar="HUB_ID",
                        help="the base model's Hub id, where the config cannot say it")
    parser.add_argument("--dataset", action="append", metavar="HUB_ID",
                        help="a training data set's Hub id to add to the card; repeatable")
    parser.set_defaults(func=lambda a: push(
        a.run_dir, a.repo_id, a.adapter_only, a.merged, a.private, a.dry_run, a.replace, a.base_model, a.dataset
    ))
