"""An evaluation suite for sentence-embedding models: STS12-16, STS-B test and two linear probes.

Scores follow MTEB's conventions so they can be set beside published figures:

- STS tasks: Spearman correlation x 100 between the cosine similarity of the two sentences'
  embeddings and the gold score; a SentEval year pools the pairs of all its sources.
- Classification probes (SST-2, TREC): a multinomial logistic regression (L2, ``C=1``, full-batch
  L-BFGS, 100 iterations, as sklearn's ``LogisticRegression(max_iter=100)`` that MTEB uses) is fit
  on the frozen embeddings of the train split; the score is test accuracy x 100. MTEB averages
  several runs on subsamples of the train split; here one deterministic run uses all of it.

The model enters only as an :data:`Encoder`, so the suite scores a teacher, a student or an
exported model in the same way. Each task calls the encoder once, with its unique texts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from distill.config import parse_section
from distill.errors import DataError, ModelError, RecipeError
from distill.progress import progress
from distill.registry import suggest
from distill.suite_tasks import SUITE_TASKS, SuiteTaskSpec, Task, read_probe, read_scored_pairs, task_name
from distill.tasks.base import spearman

__all__ = [
    "SUITE_TASKS",
    "Encoder",
    "check_tasks",
    "LabelledTexts",
    "probe_accuracy",
    "read_labelled_texts",
    "read_senteval_year",
    "read_stsb_test",
    "run_suite",
    "score_probe",
    "score_sts",
    "select_tasks",
    "spearman",
    "summarize_suite",
]

#: Maps ``n`` texts to an ``(n, d)`` float array of embeddings (batching and pooling are the caller's).
Encoder = Callable[[list[str]], np.ndarray]

#: SentEval year folders under the STS root, by task name.
_STS_YEARS = {"sts12": "STS12", "sts13": "STS13", "sts14": "STS14", "sts15": "STS15", "sts16": "STS16"}
#: Default folder of every task that is not a SentEval year, relative to the data root.
_FOLDERS = {"stsb": "stsbenchmark", "sst2": "sst2", "trec": "trec"}
_PROBES = ("sst2", "trec")
#: TREC's files are not UTF-8 (train.txt line 66 holds a lone byte 0xF0); Latin-1 reads any byte.
_ENCODINGS = {"sst2": "utf-8", "trec": "latin-1"}


# --- reading -------------------------------------------------------------------------------


def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file, split on ``\\n`` only (sentences may hold other breaks)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    chunks = path.read_bytes().split(b"\n")
    if chunks[-1] == b"":
        chunks.pop()
    lines = []
    for number, chunk in enumerate(chunks, 1):
        try:
            lines.append(chunk.decode(encoding).removesuffix("\r"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not {encoding} text ({exc.reason} at byte {exc.start} of the line)"
                            ) from None
    return lines


def _read_senteval_source(inputs: Path, gold: Path) -> tuple[list[str], list[str], list[float]]:
    pairs, scores = _lines(inputs), _lines(gold)
    if len(pairs) != len(scores):
        raise DataError(f"{inputs} has {len(pairs)} lines but {gold} has {len(scores)}; they must match line by line")
    first, second, kept = [], [], []
    for number, (pair, score) in enumerate(zip(pairs, scores, strict=True), 1):
        if not score.strip():  # an unscored pair: SentEval and MTEB leave it out
            continue
        columns = pair.split("\t")
        if len(columns) < 2:
            raise DataError(f"{inputs}:{number}: expected two tab-separated sentences, found {len(columns)} column")
        try:
            value = float(score)
        except ValueError:
            raise DataError(f"{gold}:{number}: gold score is not a number: {score!r}") from None
        first.append(columns[0])
        second.append(columns[1])
        kept.append(value)
    return first, second, kept


def read_senteval_year(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read one SemEval STS year in SentEval's layout, pooling all its sources.

    Each source is ``STS.input.<source>.txt`` (tab-separated sentence pairs; columns after the
    second are ignored) with ``STS.gs.<source>.txt`` (a 0-5 gold score a line; an empty line
    means the pair is unscored and is skipped). Sources are read in name order.

    Returns:
        ``(first, second, gold)``: the sentences of each scored pair and a float64 array of scores.

    Raises:
        DataError: A missing folder or gold file, bytes that are not UTF-8 (named by file:line),
            files whose line counts differ, a bad score, or a year with no scored pairs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"STS folder not found: {folder}")
    sources = sorted(folder.glob("STS.input.*.txt"))
    if not sources:
        raise DataError(f"{folder}: no STS.input.<source>.txt files")
    first: list[str] = []
    second: list[str] = []
    gold: list[float] = []
    for inputs in sources:
        a, b, s = _read_senteval_source(inputs, inputs.with_name(inputs.name.replace("STS.input.", "STS.gs.", 1)))
        first += a
        second += b
        gold += s
    if not gold:
        raise DataError(f"{folder}: no scored sentence pairs")
    return first, second, np.asarray(gold, dtype=np.float64)


def read_stsb_test(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read STS Benchmark's ``sts-test.csv`` (tab-separated: genre, file, year, id, score,
    sentence1, sentence2; columns after the seventh are ignored).

    Returns:
        ``(first, second, gold)`` as :func:`read_senteval_year` does.

    Raises:
        DataError: A missing file, bytes that are not UTF-8, a short line or a bad score (file:line).
    """
    path = Path(folder) / "sts-test.csv"
    first, second, gold = [], [], []
    for number, line in enumerate(_lines(path), 1):
        row = line.split("\t")
        if len(row) < 7:
            raise DataError(f"{path}:{number}: expected 7 tab-separated columns (genre, file, year, id, score, "
                            f"sentence1, sentence2), found {len(row)}")
        try:
            gold.append(float(row[4]))
        except ValueError:
            raise DataError(f"{path}:{number}: column 5 (score) is not a number: {row[4]!r}") from None
        first.append(row[5])
        second.append(row[6])
    if not gold:
        raise DataError(f"{path}: no sentence pairs")
    return first, second, np.asarray(gold, dtype=np.float64)


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with an integer class label each."""

    texts: list[str]
    labels: np.ndarray
    """``(n,)`` int64."""

    def __len__(self) -> int:
        return len(self.texts)


def read_labelled_texts(path: Path, encoding: str = "utf-8") -> LabelledTexts:
    """Read ``LABEL sentence`` lines (an integer label, one space, the text), as SST-2 and TREC ship.

    Args:
        path: The file.
        encoding: Its text encoding.

    Raises:
        DataError: A missing file, bytes not in ``encoding``, a line without an integer label
            (file:line), or a file with no examples.
    """
    texts, labels = [], []
    for number, line in enumerate(_lines(path, encoding), 1):
        if not line.strip():
            continue
        label, _, text = line.partition(" ")
        try:
            labels.append(int(label))
        except ValueError:
            raise DataError(f"{path}:{number}: expected 'LABEL sentence' with an integer label, "
                            f"found {line[:40]!r}") from None
        texts.append(text.strip())
    if not texts:
        raise DataError(f"{path}: no examples")
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int64))


# --- scoring -------------------------------------------------------------------------------


def _embed(encode: Encoder, texts: list[str]) -> np.ndarray:
    """Embeddings of ``texts``, calling ``encode`` once with each distinct text."""
    unique = list(dict.fromkeys(texts))
    vectors = np.asarray(encode(unique), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(unique):
        raise ModelError(f"the encoder returned an array of shape {vectors.shape} for {len(unique)} texts; "
                         f"expected ({len(unique)}, dim)")
    if not np.isfinite(vectors).all():
        raise ModelError("the encoder returned embeddings that are not finite (NaN or inf)")
    position = {text: i for i, text in enumerate(unique)}
    return vectors[[position[t] for t in texts]]


def score_sts(encode: Encoder, first: list[str], second: list[str], gold: np.ndarray) -> float:
    """Spearman x 100 between the cosine similarity of each pair's embeddings and the gold scores.

    A zero embedding has cosine 0 with everything rather than NaN.
    """
    if not len(first) == len(second) == len(gold):
        raise ValueError(f"{len(first)} first sentences, {len(second)} second sentences, {len(gold)} scores")
    vectors = _embed(encode, list(first) + list(second))
    a, b = vectors[: len(first)], vectors[len(first) :]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(axis=1) / np.maximum(norms, 1e-12)
    return 100.0 * spearman(cosine, np.asarray(gold))


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   c: float = 1.0, max_iter: int = 100) -> float:
    """Fit a multinomial logistic regression on ``train`` and return its test accuracy x 100.

    The objective is sklearn's: mean cross-entropy + ``||W||^2 / (2 * c * n)`` (the bias is not
    penalised), minimised from zero weights by full-batch L-BFGS in float64, so two calls give
    the same answer. Labels are any integers; a test label never seen in training counts as wrong.

    Args:
        train_x: ``(n, d)`` features.
        train_y: ``(n,)`` integer labels.
        test_x: ``(m, d)`` features.
        test_y: ``(m,)`` integer labels.
        c: Inverse regularisation strength (sklearn's ``C``).
        max_iter: L-BFGS iterations (sklearn's ``max_iter``).
    """
    classes, targets = np.unique(np.asarray(train_y), return_inverse=True)
    x = torch.as_tensor(np.asarray(train_x), dtype=torch.float64)
    t = torch.as_tensor(targets.reshape(-1), dtype=torch.long)
    weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    l2 = 1.0 / (2.0 * c * len(t))
    # scipy's L-BFGS-B settings in sklearn: 10 corrections, gtol 1e-4, ftol 64 eps
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=1e-4,
                                  tolerance_change=64 * float(np.finfo(np.float64).eps),
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, t) + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = torch.as_tensor(np.asarray(test_x), dtype=torch.float64) @ weight + bias
        predicted = classes[logits.argmax(dim=1).numpy()]
    return 100.0 * float(np.mean(predicted == np.asarray(test_y)))


def score_probe(encode: Encoder, train: LabelledTexts, test: LabelledTexts, *, limit: int | None = None,
                seed: int = 0) -> float:
    """Test accuracy x 100 of a logistic-regression probe on the frozen embeddings.

    Args:
        encode: The model under test.
        train: Training examples.
        test: Test examples.
        limit: Train on this many training examples, drawn at random with ``seed`` (all when ``None``).
        seed: Seed of that draw.
    """
    texts, labels = train.texts, train.labels
    if limit is not None and limit < len(texts):
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
        texts, labels = [texts[i] for i in keep], labels[keep]
    vectors = _embed(encode, texts + test.texts)
    return probe_accuracy(vectors[: len(texts)], labels, vectors[len(texts) :], test.labels)


# --- the suite -----------------------------------------------------------------------------


def check_tasks(tasks: list[Task]) -> None:
    """Raise ``RecipeError`` (with a did-you-mean) for a task name the suite does not know, and
    ``DataError`` for a file of the user's own task that is not there."""
    known = list(SUITE_TASKS)
    for task in tasks:
        if isinstance(task, str) and task not in known:
            raise RecipeError(f"unknown suite task '{task}';{suggest(task, known)} known: {', '.join(known)}")
        if isinstance(task, SuiteTaskSpec):
            for field, path in (("path", task.path), ("test", task.test)):
                if path is not None and not Path(path).is_file():
                    raise DataError(f"evaluate.suite task '{task.name}': {field} {path} not found (relative paths "
                                    f"are read from the working directory, {Path.cwd()})")


def select_tasks(names: list[str], own: list[Task]) -> list[Task]:
    """The tasks ``names`` asks for (``distill eval --suite``): built-in ones, the recipe's own
    tasks (``own``, its ``evaluate.suite``) by their names, and the tasks a YAML file lists (a
    name ending in ``.yaml`` or ``.yml``: a list of task mappings, or one)."""
    mine = {t.name: t for t in own if isinstance(t, SuiteTaskSpec)}
    known = [*SUITE_TASKS, *mine]
    tasks: list[Task] = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            tasks += _task_file(Path(name))
        elif name in known:
            tasks.append(mine.get(name, name))
        else:
            raise RecipeError(f"unknown suite task '{name}';{suggest(name, known)} known: {', '.join(known)}, or a "
                              "YAML file of tasks of your own")
    return tasks


def _task_file(path: Path) -> list[SuiteTaskSpec]:
    """The tasks of the user's own that a YAML file lists."""
    if not path.is_file():
        raise DataError(f"suite task file not found: {path}")
    try:
        listed = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    tasks = []
    for i, entry in enumerate(listed if isinstance(listed, list) else [listed]):
        try:  # the messages an evaluate.suite entry of a recipe gets (did-you-mean on a field)
            tasks.append(parse_section(SuiteTaskSpec, entry, ("evaluate", "suite", i)))
        except RecipeError as exc:
            raise RecipeError(f"{path}: task {i + 1}:{str(exc).removeprefix('invalid settings')}") from None
    return tasks


def _task_path(task: str, data_root: Path, sts_root: Path | None, paths: Mapping[str, Path]) -> Path:
    if task in paths:
        return Path(paths[task])
    if task in _STS_YEARS:
        return Path(sts_root if sts_root is not None else Path(data_root) / "sts12-16") / _STS_YEARS[task]
    return Path(data_root) / _FOLDERS[task]


def _required_files(task: str, folder: Path) -> list[Path]:
    if task in _STS_YEARS:
        return [folder]
    if task == "stsb":
        return [folder / "sts-test.csv"]
    return [folder / "train.txt", folder / "test.txt"]


def run_suite(encode: Encoder, tasks: list[Task], data_root: Path, *, sts_root: Path | None = None,
              paths: Mapping[str, Path] | None = None, probe_limit: int | None = None,
              seed: int = 0, label: str | None = None) -> dict[str, float]:
    """Score ``encode`` on each of ``tasks``: names from :data:`SUITE_TASKS`, or tasks of the
    user's own (:class:`~distill.suite_tasks.SuiteTaskSpec`).

    Task data is found under ``data_root`` in the shared layout (``sts12-16/STS12`` ...,
    ``stsbenchmark/sts-test.csv``, ``sst2/{train,test}.txt``, ``trec/{train,test}.txt``).
    Every name and file is checked before the encoder first runs.

    Args:
        encode: The model under test.
        tasks: Task names, scored in this order.
        data_root: Folder holding the task folders.
        sts_root: Folder holding ``STS12`` ... ``STS16``, when not ``data_root / "sts12-16"``.
        paths: A folder per task name that overrides the layout: a SentEval year folder for
            ``sts1X``, the folder of ``sts-test.csv`` for ``stsb``, the folder of ``train.txt``
            and ``test.txt`` for a probe.
        probe_limit: Train each probe on at most this many examples (all when ``None``).
        seed: Seed of the draw that ``probe_limit`` makes.
        label: Show progress over the tasks under this name (e.g. the model's role).

    Returns:
        ``{task name: score}``: Spearman x 100 for STS tasks, accuracy x 100 for probes.

    Raises:
        RecipeError: An unknown task name (in ``tasks`` or ``paths``).
        DataError: A missing or malformed data file.
    """
    paths = dict(paths or {})
    check_tasks(list(tasks) + list(paths))
    builtin = [t for t in tasks if isinstance(t, str)]
    folders = {task: _task_path(task, data_root, sts_root, paths) for task in builtin}
    for task, folder in folders.items():
        for required in _required_files(task, folder):
            if not required.exists():
                raise DataError(f"data for suite task '{task}' not found: {required}")
    scores: dict[str, float] = {}
    bar = progress(tasks, show=label is not None, desc=f"suite: {label}", unit="task", total=len(tasks))
    for task in bar:
        bar.set_postfix_str(task_name(task), refresh=False)
        scores[task_name(task)] = _score(encode, task, folders.get(task_name(task)), probe_limit, seed)
    return scores


def _score(encode: Encoder, task: Task, folder: Path | None, probe_limit: int | None, seed: int) -> float:
    if isinstance(task, SuiteTaskSpec):
        if task.kind == "sts":
            return score_sts(encode, *read_scored_pairs(task))
        train, test = (LabelledTexts(*split) for split in read_probe(task))
        return score_probe(encode, train, test, limit=probe_limit, seed=seed)
    assert folder is not None
    if task in _PROBES:
        train, test = (read_labelled_texts(folder / f"{split}.txt", _ENCODINGS[task]) for split in ("train", "test"))
        return score_probe(encode, train, test, limit=probe_limit, seed=seed)
    read = read_stsb_test if task == "stsb" else read_senteval_year
    return score_sts(encode, *read(folder))


def summarize_suite(scores_by_model: dict[str, dict[str, float]], reference: str = "teacher") -> str:
    """A markdown table: a row per model, a column per task and the average.

    Other models' cells read ``score (retention%)``, the retention being the score as a share of
    the reference model's on that task; the average's retention is the ratio of the averages.
    A missing score shows as ``-``, and an average needs every task of the table.

    Raises:
        ValueError: ``reference`` is not one of the models.
    """
    if reference not in scores_by_model:
        raise ValueError(f"reference model '{reference}' has no scores; models: {', '.join(scores_by_model)}")
    present = {task for scores in scores_by_model.values() for task in scores}
    tasks = [t for t in SUITE_TASKS if t in present] + sorted(present - set(SUITE_TASKS))
    ref = scores_by_model[reference]

    def average(scores: dict[str, float]) -> float | None:
        return float(np.mean([scores[t] for t in tasks])) if all(t in scores for t in tasks) else None

    def cell(value: float | None, base: float | None, own: bool) -> str:
        if value is None:
            return "-"
        if own or base is None or base == 0:
            return f"{value:.2f}"
        return f"{value:.2f} ({100.0 * value / base:.1f}%)"

    header = ["model", *tasks, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for model, scores in scores_by_model.items():
        own = model == reference
        cells = [cell(scores.get(t), ref.get(t), own) for t in tasks]
        cells.append(cell(average(scores), average(ref), own))
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return "\n".join(lines) + "\n"
