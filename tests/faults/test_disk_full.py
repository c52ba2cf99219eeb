"""A full disk, played by a file-size limit (``RLIMIT_FSIZE``) on the child process: a write past
it fails with ``EFBIG`` (``SIGXFSZ`` is ignored) the way one on a full disk fails with ``ENOSPC``.

What must happen: exit status 2 and one line ``distill: error: ...`` (no traceback), nothing
written before the failure lost or damaged, and the same command without the limit finishing
with exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import metrics_lines, tiny_lm_recipe

resource = pytest.importorskip("resource", reason="file-size limits need the resource module (Unix)")
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs SIGXFSZ and RLIMIT_FSIZE")

ENV = {**{k: v for k, v in os.environ.items() if k not in ("DISTILL_DEBUG", "DISTILL_KILL_AT_STEP")},
       "DISTILL_PROGRESS": "off"}


def cli(*args: str | Path, limit: int | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m distill.cli ARGS``, with no file it writes allowed past ``limit`` bytes."""

    def limited() -> None:  # in the child, before it runs Python
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, preexec_fn=limited if limit is not None else None, timeout=600)


def assert_one_line_error(out: subprocess.CompletedProcess, *parts: str) -> None:
    """The command failed as a user error: status 2, one ``distill: error:`` line last, no traceback."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("distill: error")]
    assert len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]), out.stderr[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]


def limit_between(sizes: dict[str, int], failing: str) -> int:
    """A limit that ``failing`` (of files ``sizes``) passes and every smaller one does not reach."""
    below = max((size for size in sizes.values() if size < sizes[failing]), default=0)
    return (below + sizes[failing]) // 2


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- a checkpoint


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, data_dir, gpt_pair):
    """The tiny language-model recipe (6 steps, checkpoints at 3 and 6), its uninterrupted run, and a
    run of it killed after step 4 (its checkpoint at step 3 written)."""
    root = tmp_path_factory.mktemp("disk-full-run")
    recipe = tiny_lm_recipe(root, data_dir, *gpt_pair, baseline=False, train={"threads": 1})
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    straight = cli("run", path, "--set", f"output_dir={root / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = cli("run", path, "--set", f"output_dir={root / 'killed'}", env={"DISTILL_KILL_AT_STEP": "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return path, root


@pytest.mark.parametrize("failing", ["student.safetensors", "optimizer.pt"])
def test_a_checkpoint_that_hits_a_full_disk_stops_with_one_line_and_loses_nothing(lm_run, tmp_path, failing):
    path, root = lm_run
    expected = root / "straight"
    run = tmp_path / "run"
    shutil.copytree(root / "killed", run)
    sizes = {p.name: p.stat().st_size for p in (expected / "train/student/checkpoints/step-00000006").iterdir()}
    full = cli("run", path, "--set", f"output_dir={run}", limit=limit_between(sizes, failing))
    assert "step-00000003 (step 3)" in full.stdout, "it resumed from the checkpoint at step 3"
    assert_one_line_error(full, "step 6", "checkpoint")
    checkpoints = run / "train/student/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003"], "no half-written checkpoint"

    resumed = cli("run", path, "--set", f"output_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000003 (step 3)" in resumed.stdout, "the checkpoint before the failure is intact"
    assert metrics_lines(run / "train/student") == metrics_lines(expected / "train/student")
    for weights in (expected / "student").glob("*.safetensors"):
        assert (run / "student" / weights.name).read_bytes() == weights.read_bytes()


# --------------------------------------------------------------------------- the teacher's logit cache


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory, data_dir, gpt_pair):
    """A language-model recipe with a top-8 logit cache in 32 shards of 2 examples, and its
    uninterrupted build."""
    root = tmp_path_factory.mktemp("disk-full-cache")
    recipe = tiny_lm_recipe(root, data_dir, *gpt_pair, baseline=False,
                            losses=[{"name": "token_kd", "params": {"kind": "forward_kl"}}],
                            cache={"top_k": 8, "shard_size": 2}, train={"threads": 1})
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    straight = cli("cache", path, "--set", f"cache.dir={root / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    (folder,) = (root / "straight").glob("logits-*")
    return path, folder


@pytest.mark.parametrize("failing", ["a shard", "the shard list"])
def test_a_cache_build_that_hits_a_full_disk_stops_with_one_line_and_resumes(lm_cache, tmp_path, failing):
    path, expected = lm_cache
    sizes = {p.name: p.stat().st_size for p in expected.iterdir()}
    arrays = [size for name, size in sizes.items() if name.endswith((".logp.npy", ".ids.npy"))]
    assert sizes["meta.json"] > max(arrays)
    # A shard's arrays are a couple of kB, small enough that numpy's buffered write of them can
    # fail silently. The shard list (meta.json) grows with each shard until it passes the limit.
    limit = min(arrays) - 64 if failing == "a shard" else (max(arrays) + sizes["meta.json"]) // 2
    full = cli("cache", path, "--set", f"cache.dir={tmp_path}", limit=limit)
    assert_one_line_error(full, "cannot write the logit cache")
    folder = tmp_path / expected.name
    written = json.loads((folder / "meta.json").read_text())["shards"] if (folder / "meta.json").exists() else {}
    if failing == "a shard":
        assert not written, "the first shard failed"
    else:
        assert 0 < len(written) < 32, "the shards written before the list passed the limit are kept"
    assert not [name for name in files(folder) if ".tmp-" in name], "no half-written file left"

    resumed = cli("cache", path, "--set", f"cache.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({32 - len(written)} shards)" in resumed.stderr, "only the missing shards were built"
    assert files(folder) == files(expected)
    for name in files(expected):
        assert (folder / name).read_bytes() == (expected / name).read_bytes(), name


# --------------------------------------------------------------------------- the trained student


def test_the_final_save_of_the_student_on_a_full_disk_stops_with_one_line_and_is_redone(lm_run, tmp_path):
    path, root = lm_run
    expected = root / "straight"
    run = tmp_path / "run"
    shutil.copytree(expected, run)  # trained to the end (its last checkpoint is step 6), not yet saved:
    shutil.rmtree(run / "student")
    for name in ("eval.json", "report.md", "report.html", "report.json"):
        (run / name).unlink(missing_ok=True)
    weights = max((expected / "student").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    full = cli("run", path, "--set", f"output_dir={run}", limit=weights.stat().st_size // 2)
    assert_one_line_error(full, f"cannot save the model to {run / 'student'}", "File too large", "run the same command")
    assert not (run / "student").exists(), "no half-saved student where a finished one is looked for"
    assert not (run / "eval.json").exists()

    again = cli("run", path, "--set", f"output_dir={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert files(run / "student") == files(expected / "student")
    for weights in (expected / "student").glob("*.safetensors"):
        assert (run / "student" / weights.name).read_bytes() == weights.read_bytes()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")], "the half-written save is cleared"
