"""SIGKILL at random points of ``distill run``, ``distill cache`` and ``distill generate``: the same
command run again finishes with exactly what an uninterrupted one writes.

``run`` and ``cache`` are killed after a wall-clock delay, which lands wherever the process happens
to be (a step, a checkpoint being written, the student being saved, the evaluation, a cache
shard): where each trial lands varies from machine to machine, and the invariant must hold
wherever it does. The delays are drawn (seeded) over the span between two lines the uninterrupted
run prints, so most trials interrupt the work, and each test asserts that at least one did
(return code -9). ``generate`` is killed by its teacher's server when a seeded request arrives.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import metrics_lines, tiny_lm_recipe
from generate.helpers import KEY, KEY_ENV, TinyOpenAI, api_args, read_jsonl, write_prompts

from distill.cli import main

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

TRIALS = 3
#: Children print progress lines (not bars) and flush each line, so the markers arrive on time.
ENV = {**{k: v for k, v in os.environ.items() if k not in ("DISTILL_DEBUG", "DISTILL_KILL_AT_STEP")},
       "DISTILL_PROGRESS": "", "PYTHONUNBUFFERED": "1"}


@dataclass
class Finished:
    returncode: int
    output: str
    span: float | None
    """Seconds from the ``start`` marker line to the ``end`` one (``None`` if either is missing)."""


def cli(*args: str | Path, start: str = "", end: str = "", kill_after: float | None = None) -> Finished:
    """Run ``python -m distill.cli ARGS``, SIGKILLed ``kill_after`` seconds after it prints a line
    matching ``start`` (never, when ``None`` or when it finishes first)."""
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    killer, seen, lines = None, {}, []
    try:
        for line in proc.stdout:
            lines.append(line)
            for name, pattern in (("start", start), ("end", end)):
                if pattern and name not in seen and re.search(pattern, line):
                    seen[name] = time.monotonic()
                    if name == "start" and kill_after is not None:
                        killer = threading.Timer(kill_after, proc.kill)  # a no-op once it has exited
                        killer.start()
        returncode = proc.wait()
    finally:
        watchdog.cancel()
        if killer is not None:
            killer.cancel()
    span = seen["end"] - seen["start"] if len(seen) == 2 else None
    return Finished(returncode, "".join(lines), span)


def delays(span: float | None) -> list[float]:
    """Seeded kill delays spread over ``span`` (the uninterrupted run's, start marker to end marker)."""
    assert span is not None, "the uninterrupted run did not print both markers"
    rng = random.Random(0)
    return [rng.uniform(0.0, span) for _ in range(TRIALS)]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- distill run


def test_run_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    # 24 steps over 1.5 epochs of 16 batches, a checkpoint after each: many places for a kill to land.
    recipe = tiny_lm_recipe(tmp_path, data_dir, teacher, student, baseline=False,
                            train={"max_steps": 24, "batch_size": 4, "eval_every": 8, "checkpoint_every": 1,
                                   "threads": 1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    markers = {"start": r"^student: 0/\d+ step", "end": r"^report: "}

    def run(out: Path, kill_after: float | None = None) -> Finished:
        return cli("run", path, "--set", f"output_dir={out}", kill_after=kill_after, **markers)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.output[-3000:]
    expected = tmp_path / "straight"
    codes = []
    for trial, delay in enumerate(delays(straight.span)):
        out = tmp_path / f"killed-{trial}"
        killed = run(out, delay)
        assert killed.returncode in (0, -signal.SIGKILL), killed.output[-3000:]
        codes.append(killed.returncode)
        resumed = run(out)
        assert resumed.returncode == 0, resumed.output[-3000:]
        where = f"trial {trial}, killed {delay:.3f} s after training started"
        assert metrics_lines(out / "train/student") == metrics_lines(expected / "train/student"), where
        weights = sorted(p.name for p in (expected / "student").glob("*.safetensors"))
        assert weights, "the student is saved as safetensors"
        for name in weights:
            assert (out / "student" / name).read_bytes() == (expected / "student" / name).read_bytes(), where
        scores = [json.loads((folder / "eval.json").read_text())["models"]["student"]["perplexity"]
                  for folder in (out, expected)]
        assert scores[0] == scores[1], where
        assert files(out) == files(expected), f"{where}: no file left over, none missing"
    assert -signal.SIGKILL in codes, f"no trial interrupted the run (return codes {codes})"


# --------------------------------------------------------------------------- distill cache


def test_cache_build_killed_at_random_points_resumes_to_the_uninterrupted_cache(tmp_path, data_dir, gpt_pair):
    teacher, student = gpt_pair
    recipe = tiny_lm_recipe(tmp_path, data_dir, teacher, student, baseline=False,
                            losses=[{"name": "token_kd", "params": {"kind": "forward_kl", "temperature": 2.0}}],
                            cache={"top_k": 8, "shard_size": 2}, train={"threads": 1})  # 32 shards
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    markers = {"start": r"^logit cache: 0/\d+ shard", "end": r"^\s+k=8, "}

    def build(root: Path, kill_after: float | None = None) -> Finished:
        return cli("cache", path, "--set", f"cache.dir={root}", kill_after=kill_after, **markers)

    straight = build(tmp_path / "straight")
    assert straight.returncode == 0, straight.output[-3000:]
    (expected,) = (tmp_path / "straight").glob("logits-*")
    meta = json.loads((expected / "meta.json").read_text())
    assert len(meta["shards"]) == 32
    codes = []
    for trial, delay in enumerate(delays(straight.span)):
        root = tmp_path / f"killed-{trial}"
        killed = build(root, delay)
        assert killed.returncode in (0, -signal.SIGKILL), killed.output[-3000:]
        codes.append(killed.returncode)
        resumed = build(root)
        assert resumed.returncode == 0, resumed.output[-3000:]
        where = f"trial {trial}, killed {delay:.3f} s after the build started"
        folder = root / expected.name
        assert json.loads((folder / "meta.json").read_text()) == meta, where
        for shard in meta["shards"].values():
            for name in shard["files"]:
                assert (folder / name).read_bytes() == (expected / name).read_bytes(), f"{where}: {name}"
        # What a kill can leave: the temporary file it was writing (its name holds the killed pid).
        stray = files(folder) - files(expected)
        assert all(re.search(r"\.tmp-\d+$", name) for name in stray), f"{where}: {stray}"
    assert -signal.SIGKILL in codes, f"no trial interrupted the build (return codes {codes})"


# --------------------------------------------------------------------------- distill generate


class KillingServer(TinyOpenAI):
    """The generate tests' OpenAI-compatible server, which kills its ``client`` (SIGKILL) when the
    client's ``kill_at``-th request arrives, before answering it."""

    client: subprocess.Popen | None = None
    kill_at = 0
    arrived = 0

    def answer(self, path, authorization, body):
        self.arrived += 1
        if self.client is not None and self.arrived == self.kill_at:
            self.client.kill()
            self.client.wait()
            return 500, {}, {"error": {"message": "the client is gone"}}
        return super().answer(path, authorization, body)


@pytest.fixture
def server(gpt_pair):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny generate calls: a second thread only adds waiting
    srv = KillingServer(gpt_pair[0], KEY)
    srv.httpd.handle_error = lambda request, address: None  # its reply to a killed client fails
    yield srv
    srv.close()
    torch.set_num_threads(threads)


def test_generate_killed_mid_way_resumes_to_the_uninterrupted_output(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    write_prompts(tmp_path / "prompts.jsonl")  # 5 distinct prompts: 5 requests of 2 samples each
    assert main(api_args(server, tmp_path, "--output", str(tmp_path / "straight.jsonl"))) == 0
    expected = {name: (tmp_path / f"straight{name}").read_bytes() for name in (".jsonl", ".rejected.jsonl")}
    assert len(read_jsonl(tmp_path / "straight.jsonl")) + len(read_jsonl(tmp_path / "straight.rejected.jsonl")) == 10
    # The prompts before the request the client is killed at are answered, and their rows
    # appended and synced; that one and those after it are not.
    for trial, kill_at in enumerate(random.Random(0).sample(range(1, 6), TRIALS)):
        out = tmp_path / f"killed-{trial}.jsonl"
        args = [sys.executable, "-m", "distill.cli", *api_args(server, tmp_path, "--output", str(out))]
        server.arrived, server.kill_at = 0, kill_at
        server.client = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env={**ENV, KEY_ENV: KEY})
        output, _ = server.client.communicate(timeout=600)
        assert server.client.returncode == -signal.SIGKILL, output[-3000:]
        server.client = None
        where = f"trial {trial}, killed at request {kill_at}"
        assert len(read_jsonl(out)) < len(read_jsonl(tmp_path / "straight.jsonl")), where
        assert main(api_args(server, tmp_path, "--output", str(out))) == 0
        for name, data in expected.items():
            assert out.with_suffix(name).read_bytes() == data, f"{where}: {name}"
