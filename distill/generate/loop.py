"""The generation loop: ask the teacher for every missing sample of every selected prompt, judge the
completions, append them to the output, and (under ``--nproc``) merge the processes' shards."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill.generate.merge import merge_shards
from distill.generate.outputs import OutputPaths, completion_digest, load_done, open_output, write_meta
from distill.generate.prompts import PromptRow, read_prompts, select_shard, unique_prompts
from distill.generate.settings import Filters, Sampling, cut_at_stop
from distill.generate.teacher import Teacher, TeacherUnavailableError

__all__ = ["GenerateSummary", "generate", "generate_in_processes"]

# Every module of the package logs as "distill.generate", the name its lines have always carried.
log = logging.getLogger(__package__)


@dataclass
class GenerateSummary:
    """What a run did."""

    output: Path
    prompts: int = 0
    """Rows in the input."""
    unique: int = 0
    """Distinct prompts among them."""
    selected: int = 0
    """Distinct prompts in this shard (all of them without ``--shard``)."""
    already_done: int = 0
    """Prompts whose every sample was in the output or the rejected file already."""
    generated: int = 0
    """Prompts sent to the teacher in this run."""
    kept: int = 0
    """Samples written to the output in this run."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Samples rejected in this run, by reason."""

    @property
    def done(self) -> int:
        """Prompts of this shard whose samples are all written or rejected now."""
        return self.generated + self.already_done

    def record(self, keep: list[dict[str, Any]], reject: list[dict[str, Any]]) -> None:
        """Count one generated prompt's kept and rejected rows."""
        self.generated += 1
        self.kept += len(keep)
        self.rejected.update(r["reason"].split()[0] for r in reject)

    def __str__(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items()))
        return (f"{self.output}: {self.kept} sample(s) kept, {sum(self.rejected.values())} rejected"
                f"{f' ({why})' if why else ''}; {self.generated} prompt(s) generated, {self.already_done} "
                f"already done, {self.prompts - self.unique} duplicate prompt(s) skipped, "
                f"{self.selected} of {self.unique} distinct prompt(s) selected")


def _output_row(row: PromptRow, completion: str, sample: int) -> dict[str, Any]:
    """A kept sample: a chat gets the completion as its final assistant turn, which is what
    training reads (the loss counts the last assistant message only)."""
    out: dict[str, Any] = {"id": row.id, "index": row.index}
    if row.messages is not None:
        out["messages"] = [*row.messages, {"role": "assistant", "content": completion}]
    else:
        out["prompt"] = row.prompt
    return {**out, "completion": completion, "sample": sample}


def _judge(row: PromptRow, samples: list[int], completions: list[str], sampling: Sampling, filters: Filters,
           kept: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split one prompt's completions into output rows and rejected rows (``kept``: digests of the
    prompt's completions kept so far, updated)."""
    keep, reject = [], []
    for sample, text in zip(samples, completions, strict=True):
        text = cut_at_stop(text, sampling.stop)
        reason = filters.reject_reason(row, text, sample)
        if reason is None and completion_digest(text) in kept:
            reason = "duplicate"
        if reason is None:
            kept.add(completion_digest(text))
            keep.append(_output_row(row, text, sample))
        else:
            # Not "completion": a training reader pointed at the folder must not take these for data.
            reject.append({"id": row.id, "index": row.index, **row.fields(), "rejected_completion": text,
                           "sample": sample, "reason": reason})
    return keep, reject


def _ask(teacher: Teacher, row: PromptRow, missing: list[int], sampling: Sampling,
         summary: GenerateSummary) -> list[str]:
    """The teacher's completions of ``row`` for the ``missing`` samples.

    Raises:
        TeacherUnavailableError: The API kept failing; the message says how far the run got and
            that it can be resumed.
    """
    try:
        return teacher.complete(row, len(missing), sampling.prompt_seed(row, missing[0]))
    except TeacherUnavailableError as exc:
        raise TeacherUnavailableError(
            f"{exc}. {summary.done} of {summary.selected} prompt(s) are done in "
            f"{summary.output}; run the same command again to resume") from None


def _header(teacher: Teacher, sampling: Sampling, filters: Filters, shard: tuple[int, int] | None) -> dict[str, Any]:
    """What the meta file pins: a resume with anything else here is refused."""
    return {"settings": {**asdict(sampling), "stop": list(sampling.stop), **filters.settings()},
            "teacher": teacher.identity(), "shard": f"{shard[0]}/{shard[1]}" if shard else None}


def generate(input_path: Path, output: Path, teacher: Teacher, sampling: Sampling, filters: Filters | None = None,
             shard: tuple[int, int] | None = None, progress_every: float = 30.0) -> GenerateSummary:
    """Write ``sampling.n`` teacher completions of every distinct prompt of ``input_path``.

    Rows go to ``output`` (or its shard file), rejected samples beside it; both are appended and
    synced after each prompt. Pairs (prompt, sample) found in either file are not asked again.

    Args:
        input_path: JSONL prompts (see :func:`read_prompts`).
        output: The output JSONL file; its rejected and meta files are named after it.
        teacher: Where completions come from.
        sampling: Sampling settings (the teacher samples with the same ones).
        filters: Which completions to keep; all of them when ``None``.
        shard: ``(I, N)``: only the distinct prompts at positions ``p`` with ``p % N == I``.
        progress_every: Seconds between progress lines in the log.

    Raises:
        TeacherUnavailableError: The API kept failing; the message says the run can be resumed.
        DistillError: Bad input, or an output made with other settings.
    """
    filters = filters or Filters()
    rows = read_prompts(input_path)
    if len({r.prompt is None for r in rows}) > 1:
        log.warning("%s mixes 'prompt' and 'messages' rows; training reads one kind of record per data set, "
                    "so give each kind its own prompts file", input_path)
    unique = unique_prompts(rows)
    todo = select_shard(unique, shard)
    paths = OutputPaths.of(output, shard)
    header = _header(teacher, sampling, filters, shard)
    paths.output.parent.mkdir(parents=True, exist_ok=True)
    with open_output(paths) as (out, rejected):
        write_meta(paths, header, {"input": str(input_path)})
        done, kept = load_done(paths, sampling.n)
        summary = GenerateSummary(paths.output, len(rows), len(unique), len(todo))
        last_log = time.monotonic()
        for row in todo:
            missing = [i for i in range(sampling.n) if i not in done.get(row.key, ())]
            if not missing:
                summary.already_done += 1
                continue
            completions = _ask(teacher, row, missing, sampling, summary)
            keep, reject = _judge(row, missing, completions, sampling, filters, kept.pop(row.key, set()))
            rejected.write(reject)
            out.write(keep)
            summary.record(keep, reject)
            if time.monotonic() - last_log > progress_every:
                last_log = time.monotonic()
                log.info("%d/%d prompts, %d samples kept", summary.done, len(todo), summary.kept)
    return summary


def generate_in_processes(input_path: Path, output: Path, teacher: Teacher, sampling: Sampling,
                          filters: Filters) -> str:
    """One of ``--nproc`` processes: generate shard RANK of WORLD, wait for the others, and (the
    first process) merge every shard into ``output``.

    Returns:
        The summary to print: this process's, and the first process's merge.
    """
    from accelerate import PartialState  # imports torch: not for every run of the package

    state = PartialState(cpu=True)  # joins the others over gloo: only to wait for them
    rank, world = state.process_index, state.num_processes
    summary = generate(input_path, output, teacher, sampling, filters, (rank, world))
    state.wait_for_everyone()
    if rank != 0:
        return f"process {rank}: {summary}"
    shards = [OutputPaths.of(output, (i, world)).output for i in range(world)]
    return f"{summary}\n{merge_shards(output, shards)}"
