"""``distill push``: a finished run's student, with its model card, to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError, RunFolderError
from distill.runner import final_folder, report_run

__all__ = ["push_run"]


def push_run(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload ``folder/student`` (weights, config, tokenizer and the model card, rewritten first
    from the run's evaluation) to the Hub repository ``repo_id``, creating it if needed; an
    ONNX export of the run (``distill export --format onnx``) goes along under ``onnx/``.

    The token is ``token``, else what ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``).
    Returns the URL of the commit.

    Raises:
        RunFolderError: The run has no saved student or no evaluation.
        DistillError: The Hub refused (no token, no access, a bad name), in one line.
    """
    folder = final_folder(folder)
    student = folder / "student"
    if not (student / "distill.json").is_file():
        raise RunFolderError(f"{folder} has no trained student yet (student/distill.json); finish the run first")
    if not (folder / "eval.json").is_file():
        raise RunFolderError(f"{folder} has no evaluation (eval.json) for the model card; run distill eval {folder}")
    report_run(folder)  # the card, up to date with the evaluation and the exports
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
    except ImportError:
        raise DistillError("distill push needs huggingface_hub: pip install huggingface_hub") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(student), repo_id=repo_id, repo_type="model",
                                   commit_message=f"distill: the student of {folder.name}")
        onnx = folder / "export" / "onnx"
        if onnx.is_dir():
            commit = api.upload_folder(folder_path=str(onnx), path_in_repo="onnx", repo_id=repo_id,
                                       repo_type="model", commit_message=f"distill: ONNX export of {folder.name}")
    except (HfHubHTTPError, HFValidationError, LocalTokenNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"the Hub refused the upload to '{repo_id}': {first}") from None
    except Exception as exc:  # the network under the Hub client (httpx, sockets): unreachable, timed out, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"could not reach the Hub to upload to '{repo_id}' ({type(exc).__name__}: {first}); "
                           "check the network and run the same command again") from None
    return str(getattr(commit, "commit_url", commit))
