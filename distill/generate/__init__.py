"""Sequence-level distillation data: a teacher's completions of a file of prompts.

The student then learns from the teacher's text (``prompt`` / ``messages`` + ``completion``
rows, loss on the completion only) instead of its logits: the recipe of Kim & Rush,
"Sequence-Level Knowledge Distillation" (2016), and of the models DeepSeek-R1 was distilled
into. The teacher is a local Hugging Face causal LM or any model behind an OpenAI-compatible
HTTP API.

A run is resumable at every point: each prompt's rows are appended and synced to disk as soon as
it is finished, rejected samples are recorded beside the output, and the same command run again
asks only for the (prompt, sample) pairs that are in neither file. The settings are written to a
meta file beside the output, and a resume with other settings is refused.

Files, for ``--output gen.jsonl``::

    gen.jsonl            kept samples, one row each
    gen.rejected.jsonl   samples a filter rejected, or duplicates of a kept one, with the reason
                         (the text under ``rejected_completion``, so no reader trains on it)
    gen.meta.json        settings and teacher identity (never the API key)
    gen.shard-I-of-N.*   the same three for shard I of N (``--shard I/N``)
    gen.sha256           checksums of a merged output (``--merge``)

Train on ``gen.jsonl`` itself rather than its folder: a folder's shard files would be read too.

The modules, lowest first: :mod:`.prompts` (reading, dedup, shards), :mod:`.settings` (sampling
and filters), :mod:`.teacher` (what the loop needs from a teacher), :mod:`.api` and :mod:`.local`
(the two teachers), :mod:`.outputs` (files, meta, resume bookkeeping), :mod:`.merge` (shards into
one output, with checksums) and :mod:`.loop` (:func:`generate`). The command line is in
:mod:`distill.cli`.
"""

from distill.generate.api import OpenAITeacher
from distill.generate.local import LocalTeacher
from distill.generate.loop import GenerateSummary, generate
from distill.generate.merge import merge_shards
from distill.generate.outputs import OutputPaths
from distill.generate.prompts import PromptRow, parse_shard, prompt_key, read_prompts, unique_prompts
from distill.generate.settings import Filters, Sampling, cut_at_stop
from distill.generate.teacher import Teacher, TeacherUnavailableError

__all__ = [
    "Filters",
    "GenerateSummary",
    "LocalTeacher",
    "OpenAITeacher",
    "OutputPaths",
    "PromptRow",
    "Sampling",
    "Teacher",
    "TeacherUnavailableError",
    "cut_at_stop",
    "generate",
    "merge_shards",
    "parse_shard",
    "prompt_key",
    "read_prompts",
    "unique_prompts",
]
