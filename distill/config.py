"""Typed recipe: the YAML a user writes, validated before anything is built.

A recipe is data. It is read with ``yaml.safe_load`` and checked by the pydantic classes
below (the sections are :mod:`distill.specs`'s); an error names the field, the bad value and
what is allowed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from distill.errors import RecipeError
from distill.losses import LOSSES
from distill.registry import suggest
from distill.specs import (
    CacheSpec,
    DataSpec,
    DeriveSpec,
    EvalSpec,
    LayerSpec,
    LossSpec,
    MixSpec,
    ModelSpec,
    OnPolicySpec,
    Spec,
    StageSpec,
    TrainSpec,
)

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
    "Recipe",
    "StageSpec",
    "TrainSpec",
    "load_recipe",
    "parse_recipe",
    "parse_section",
]


class Recipe(Spec):
    """A distillation recipe."""

    name: str
    """Run name; the default output folder is ``runs/<name>``."""
    task: Literal["sts", "embedding", "classification", "regression", "lm"]
    """``sts``: sentence embeddings scored by Spearman correlation on sentence pairs;
    ``embedding``: sentence embeddings learnt from unlabelled text through the teacher alone,
    scored by agreement with the teacher on held-out text (and by ``evaluate.suite``);
    ``classification``: class logits scored by accuracy; ``regression``: a score per text or text
    pair (a ``transformers`` classifier with one output), scored by Spearman correlation with
    the gold scores; ``lm``: causal language modelling scored by perplexity on held-out text
    (lower is better)."""
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
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed for initialisation, data order and dropout (0 to 2**32 - 1)."""
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
    baseline_from: Path | None = None
    """The model folder the baseline starts from; ``null``: the run's student as built. Set by
    ``stages``: a later stage's baseline continues the baseline of the stage before it (the same
    stages without the teacher), not that stage's distilled student."""
    evaluate: EvalSpec = EvalSpec()
    """Final evaluation settings."""
    stages: list[StageSpec] = []
    """Run the recipe in stages, e.g. general distillation on unlabelled text, then a
    task-specific stage (TinyBERT's two stages). Each stage names the fields it changes; a field
    a stage gives replaces the recipe's whole (a section too: give all the ``train`` settings
    the stage needs). The first stage trains the recipe's student, each later one the student
    the stage before it trained; each later stage's baseline continues the baseline of the stage
    before it, so it never learns from the teacher. Each stage is a run of its own in ``<run folder>/<stage name>``,
    resumed or reused like any run; the run folder's report shows every stage's rows."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
            raise ValueError(f"'{name}' is not a plain name (letters, digits, '.', '_', '-'; no '/' or '..'): "
                             "it names the run folder under runs/; give output_dir to write elsewhere")
        return name

    @model_validator(mode="before")
    @classmethod
    def _derived_reads_as_teacher(cls, data: Any) -> Any:
        """A derived student reads what its teacher reads: its ``max_length`` is the teacher's
        unless the recipe gives one."""
        if isinstance(data, dict):
            student, teacher = data.get("student"), data.get("teacher")
            if (isinstance(student, dict) and isinstance(teacher, dict) and student.get("derive") is not None
                    and "max_length" not in student and "max_length" in teacher):
                data = {**data, "student": {**student, "max_length": teacher["max_length"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.losses and not self.task_loss_weight:
            raise ValueError("losses: empty and task_loss_weight is 0, so there is nothing to train on; "
                             "give a distillation loss or a task_loss_weight above 0")
        if self.teacher.derive is not None:
            raise ValueError("teacher.derive: only the student can be derived")
        if self.teacher.kind is None:
            raise ValueError("teacher.kind: required (torch, hf-classifier or hf-embedding)")
        self._check_members()
        kind = self.student.kind or self.teacher.kind
        if self.student.derive is not None and kind == "hf-causal-lm" and self.student.derive.vocab == "data":
            raise ValueError("student.derive.vocab: a causal-LM student keeps the teacher's vocabulary "
                             "(token-level losses compare whole next-token distributions); use 'all'")
        if self.student.derive is not None and kind == "torch":
            raise ValueError("student.derive: only Hugging Face students can be derived")
        if self.student.derive is not None and self.student.source is not None and kind != "hf-embedding":
            raise ValueError("student.source with derive: only an hf-embedding student is derived from a model other "
                             "than the teacher (each model reads the texts with its own tokenizer); drop source to "
                             "derive from the teacher, or derive to load the student whole")
        if self.student.derive is None and self.student.source is None and self.student.arch is None:
            raise ValueError("student: give derive, source or arch")
        if self.teacher.kind == "static-embedding":
            raise ValueError("teacher.kind: 'static-embedding' is a student kind")
        if kind == "static-embedding" and self.student.derive is not None:
            d = self.student.derive
            if d.layers is not None or d.num_attention_heads or d.intermediate_size:
                raise ValueError("student.derive: a static-embedding student has no layers, heads or feed-forward; "
                                 "give hidden_size (its width) and optionally vocab")
        expected = {"sts": {"hf-embedding", "static-embedding"}, "embedding": {"hf-embedding", "static-embedding"},
                    "classification": None, "regression": {"hf-classifier"},
                    "lm": {"hf-causal-lm"}}[self.task]
        for role, k in (("teacher", self.teacher.kind), ("student", kind)):
            if expected and k not in expected:
                raise ValueError(f"{role}.kind: task '{self.task}' needs one of {sorted(expected)}, got '{k}'")
            if self.task == "classification" and k in ("hf-embedding", "hf-causal-lm"):
                raise ValueError(f"{role}.kind: task 'classification' needs class logits, not '{k}' outputs")
        self._check_data(kind)
        if self.task == "embedding" and (self.task_loss_weight or not self.losses):
            raise ValueError("task_loss_weight: task 'embedding' has no labels, so no task loss; set it to 0 and give "
                             "distillation losses (e.g. cosine and mse to the teacher's embedding)")
        self._check_teacher_online()
        if self.stages:
            self.stage_recipes()  # each stage is a recipe of its own, checked now
        return self

    def _check_members(self) -> None:
        """A teacher of several models (``teacher.members``): what it can and cannot be."""
        if self.student.members:
            raise ValueError("student.members: only the teacher can be several models")
        if not self.teacher.members:
            return
        if self.teacher.kind == "hf-causal-lm":
            raise ValueError("teacher.members: language models' tokens differ with each tokenizer, so their "
                             "next-token outputs cannot be joined; use one teacher")
        if self.train.shard_teacher:
            raise ValueError("train.shard_teacher: a teacher of members is replicated on each process, not sharded")
        tapped = [s.name for s in self.losses if s.layers]
        if tapped:
            raise ValueError(f"losses: {tapped[0]} taps the teacher's layers, and a teacher of members has no one set "
                             "of layers; compare its joint outputs (embedding or logits)")

    def _check_data(self, kind: str) -> None:
        """The data's format and columns against the task and the models' kinds."""
        formats = {"sts": {"stsb"}, "classification": {"fashion-mnist", "image-folder", *TEXT_LABELLED},
                   "regression": set(TEXT_LABELLED), "embedding": {"text", "jsonl", "parquet", "hf-dataset"},
                   "lm": {"text", "jsonl", "parquet", "hf-dataset"}}[self.task]
        if self.data.format not in formats:
            raise ValueError(f"data.format: task '{self.task}' reads {sorted(formats)}, got '{self.data.format}'")
        if isinstance(self.data.text_column, list) and self.task not in ("classification", "regression"):
            raise ValueError(f"data.text_column: task '{self.task}' reads one text per example; text pairs are for "
                             "tasks 'classification' and 'regression'")
        distributions = [s.name for s in self.losses if LOSSES.get(s.name).traits.output == "logits"]
        if self.task == "regression" and distributions:
            raise ValueError(f"losses: {distributions[0]} compares class distributions, and a regression head has one "
                             "output; compare the scores with mse (on: logits)")
        images = self.data.format == "image-folder" or self.data.image_column is not None
        for name in ("image_size", "channels"):
            if getattr(self.data, name) is not None and not images:
                raise ValueError(f"data.{name}: applies to images read from an image-folder or an hf-dataset's "
                                 f"image_column, not to data.format '{self.data.format}'")
        plain = [s.name for s in self.losses if not s.layers and s.name != "mse"]
        if self.task == "regression" and plain:
            raise ValueError(f"losses: {plain[0]} on a regression head's one output teaches nothing; compare the "
                             "scores with mse, or hidden states with layers")
        if self.data.image_column is not None and (self.task, self.data.format) != ("classification", "hf-dataset"):
            raise ValueError("data.image_column: images are read from an hf-dataset, by task 'classification'")
        if self.task == "classification":
            images = self.data.format not in TEXT_LABELLED or self.data.image_column is not None
            needs = "torch" if images else "hf-classifier"
            for role, k in (("teacher", self.teacher.kind), ("student", kind)):
                if k != needs:
                    raise ValueError(f"{role}.kind: data.format '{self.data.format}' is "
                                     f"{'text' if needs != 'torch' else 'images'}, so the models are '{needs}', "
                                     f"got '{k}'")
        if self.data.mix:  # images here: set for task 'classification' just above
            other = (f"task is '{self.task}'" if self.task not in ("embedding", "classification", "regression")
                     else "examples are images" if images
                     else "examples are text pairs" if isinstance(self.data.text_column, list) else None)
            if other:
                raise ValueError(f"data.mix: adds unlabelled single texts (tasks 'embedding', 'classification' and "
                                 f"'regression' of texts), and this recipe's {other}")
        if self.evaluate.suite and self.task not in ("sts", "embedding"):
            raise ValueError(f"evaluate.suite: the suite scores sentence embeddings, and task '{self.task}' has none")

    def _check_teacher_online(self) -> None:
        """Settings that need the teacher run online, beside the training."""
        cross_vocab = any(s.name == "cross_vocab_kd" for s in self.losses)
        if self.cache.enabled and self.cache.top_k is not None and cross_vocab:
            raise ValueError("cache.top_k: a logit cache holds the teacher's top tokens at its own positions; "
                             "cross_vocab_kd pairs positions across two tokenizers and runs the teacher online "
                             "(set cache.top_k: null)")
        default = inspect.signature(LOSSES.get("token_kd")).parameters["kind"].default
        kinds = sorted({s.params.get("kind", default) for s in self.losses if s.name == "token_kd"} - {"forward_kl"})
        if self.cache.enabled and self.cache.sample and kinds:
            raise ValueError(f"cache.sample: drawn tokens estimate the teacher's distribution for forward KL only; "
                             f"this recipe's token_kd uses {kinds} (set cache.sample: false for a top-k cache)")
        if self.train.shard_teacher and self.cache.top_k is not None:
            raise ValueError("train.shard_teacher: a sharded teacher runs online, beside the training; build the "
                             "logit cache without it (distill cache) or set cache.top_k: null")
        if self.on_policy is not None:
            if not any(s.name == "token_kd" for s in self.losses):
                raise ValueError("on_policy: the teacher scores the student's continuations token by token; "
                                 "add a token_kd loss")
            if cross_vocab:
                raise ValueError("on_policy: cross_vocab_kd pairs positions by where tokens end in the text, and the "
                                 "student's own continuations are token ids with no text; use token_kd (one "
                                 "tokenizer) or drop on_policy")
            if self.cache.top_k is not None:
                raise ValueError("on_policy: a logit cache holds the teacher's view of the data, not of text the "
                                 "student writes during training; set cache.top_k: null (the teacher runs online)")

    def stage_recipes(self) -> list[Recipe]:
        """The recipe of each stage, in order (empty for a recipe without stages).

        Raises:
            ValueError: A stage that changes a field stages cannot change, a repeated stage
                name, or a stage whose recipe is invalid (named by the stage).
        """
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: every stage needs its own name, got {names}")
        base = self.model_dump(mode="json", exclude={"stages", "output_dir"})
        recipes: list[Recipe] = []
        for i, stage in enumerate(self.stages):
            changes = stage.changes()
            fixed = sorted(set(changes) & {"name", "output_dir", "stages", "student", "seed"})
            if fixed:
                raise ValueError(f"stages.{i}: stage '{stage.name}': {fixed} cannot change between stages (the student "
                                 "of a later stage is the one the stage before it trained)")
            data = {**base, **changes, "name": f"{self.name}.{stage.name}",
                    "output_dir": str(self.run_dir() / stage.name)}
            if recipes:
                data["student"] = self._student_of(recipes[-1])
                if data.get("baseline", True) and "baseline_from" not in changes:
                    data["baseline_from"] = self._baseline_of(recipes[-1], i)
            try:
                recipes.append(Recipe.model_validate(data))
            except ValidationError as exc:
                lines = "; ".join(_format_error(dict(e)) for e in exc.errors())
                raise ValueError(f"stages.{i}: stage '{stage.name}': {lines}") from None
        return recipes

    def _student_of(self, before: Recipe) -> dict[str, Any]:
        """The student spec of the stage after ``before``: the student ``before`` trains."""
        return self._student_at(before.run_dir() / "student")

    def _student_at(self, folder: Path) -> dict[str, Any]:
        """This recipe's student spec, loading the student from ``folder`` instead of building it."""
        spec = self.student.model_dump(mode="json", exclude={"source", "arch", "arch_args", "derive", "init"})
        return {**spec, "kind": self.student_kind, "source": str(folder)}

    def baseline_start(self) -> Recipe:
        """This recipe with the student it builds replaced by :attr:`baseline_from`'s model."""
        if self.baseline_from is None:
            return self
        student = ModelSpec.model_validate(self._student_at(self.baseline_from))
        return self.model_copy(update={"student": student, "baseline_from": None})

    def _baseline_of(self, before: Recipe, i: int) -> str:
        """Where stage ``i``'s baseline starts: the baseline of the stage before it, which never
        learnt from the teacher either."""
        if not before.baseline:
            raise ValueError(f"stages.{i}: stage '{self.stages[i].name}': its baseline continues the baseline of "
                             f"stage '{self.stages[i - 1].name}', which trains none; set baseline: true there, or "
                             "baseline: false here")
        return str(before.run_dir() / "baseline")

    @property
    def student_kind(self) -> str:
        """The student's model kind (the teacher's unless the recipe says otherwise)."""
        return self.student.kind or self.teacher.kind or "torch"

    def run_dir(self) -> Path:
        """The run folder of this recipe."""
        return self.output_dir or Path("runs") / self.name

    def identity(self) -> str:
        """Hash of everything that changes results: not where they are written, not which
        checkpoints are kept, and not fields left at their defaults (so that a field added to
        distill later, with a default, leaves the identity of earlier runs as it was)."""
        data = self.model_dump(mode="json", exclude={"output_dir": True, "train": {"keep_checkpoints"}},
                               exclude_defaults=True)
        data = {key: value for key, value in data.items() if value != {}}  # a section left with nothing set
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, every default written out."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


#: The labelled-text formats of task ``classification``.
TEXT_LABELLED = ("labelled-text", "csv", "tsv", "jsonl", "parquet", "hf-dataset")


def _item(node: list[Any], key: str, dotted: str) -> int:
    if int(key) >= len(node):
        raise RecipeError(f"--set {dotted}: there is no item {key}; the list has {len(node)}")
    return int(key)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        if isinstance(node, list) and not key.isdigit():
            where = ".".join(keys[:i])
            raise RecipeError(f"--set {dotted}: {where} is a list; name an item by its number ({where}.0."
                              f"{'.'.join(keys[i:])}), or set the whole list ({where}=[...])")
        if i == len(keys) - 1:
            break
        if isinstance(node, list):
            node = node[_item(node, key, dotted)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise RecipeError(f"--set {dotted}: '{key}' is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_item(node, last, dotted)] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``3``, ``1e-3``, ``[0, 5]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set '{item}': expected key=value, for example train.lr=1e-3")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise RecipeError(f"--set {item}: the value is not valid YAML ({problem}); quote text, close brackets: "
                              "losses=[{name: kd}]") from None
        _set_path(data, key.strip(), value)
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


SpecT = TypeVar("SpecT", bound=BaseModel)


def parse_section(cls: type[SpecT], data: Any, where: tuple[str | int, ...]) -> SpecT:
    """Validate one section of a recipe given on its own (the Python API's ``train=`` dict or a
    loss), with the messages a recipe's would get; ``where`` is its place in a recipe
    (``("train",)``, ``("losses", 0)``).

    Raises:
        RecipeError: With one line per problem.
    """
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error({**dict(e), "loc": (*where, *e["loc"])}) for e in exc.errors()]
        raise RecipeError("invalid settings\n  " + "\n  ".join(lines)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: The YAML file.
        overrides: ``key=value`` strings applied before validation (``--set`` on the CLI).
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a folder; give the recipe's YAML file")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a recipe is a YAML text "
                          "file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{where}: not valid YAML ({problem})") from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return parse_recipe(data, source=str(path))
