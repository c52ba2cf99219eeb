"""What a user is told when things go wrong: a catalogue of bad inputs and faults, run against
the command line of this tree and (``--before``) of an earlier checkout, side by side.

Each case sets up its files in a fresh folder, runs ``python -m distill.cli ...`` with the tree
on ``PYTHONPATH``, and records the exit status, whether a traceback was printed, the last line
of stderr, and, where the case can check it, whether the result was wrong (a NaN student saved,
a user's file overwritten, a secret printed). Prints a markdown table:

    git worktree add /tmp/before <commit>
    python bench/error_catalogue.py --before /tmp/before

Needs ../shared/data (Fashion-MNIST, STS Benchmark) and the venv's packages; about 3 minutes a tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SECRET = "sk-distill-catalogue-secret"


@dataclass
class Case:
    category: str
    what: str
    setup: Callable[[Path], list[str]]
    """Writes the case's files into a folder; returns the CLI arguments."""
    env: dict[str, str] | None = None
    wrong: Callable[[Path, subprocess.CompletedProcess], str] | None = None
    """Returns what went wrong beyond the message ('' when nothing), given the folder and the result."""


def _teacher(folder: Path) -> Path:
    """A tiny ConvNet teacher saved as distill saves PyTorch classifiers (the same in both trees)."""
    code = ("import sys, torch; from distill.models.adapters import TorchClassifierAdapter; "
            "from distill.models.zoo import ConvNet; torch.manual_seed(0); "
            "from pathlib import Path; "
            "TorchClassifierAdapter(ConvNet(width=4), 'convnet', {'width': 4}).save(Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(folder / "teacher")], check=True, cwd=folder,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return folder / "teacher"


def _recipe(folder: Path, **changes) -> Path:
    recipe = {
        "name": "case", "task": "classification",
        "teacher": {"kind": "torch", "source": str(folder / "teacher")},
        "student": {"arch": "convnet", "arch_args": {"width": 2}},
        "data": {"format": "fashion-mnist", "path": str(DATA / "fashion-mnist"),
                 "train_limit": 256, "eval_limit": 64, "test_limit": 64},
        "losses": [{"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}}], "task_loss_weight": 0.5,
        "output_dir": str(folder / "run"),
        "train": {"max_steps": 8, "batch_size": 32, "eval_every": 4, "checkpoint_every": 3},
        "cache": {"dir": str(folder / "cache")}, "baseline": False,
        "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _with_teacher(**changes) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        _teacher(folder)
        return ["run", str(_recipe(folder, **changes))]
    return setup


def _validate(extra: list[str] | None = None, **changes) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        (folder / "teacher").mkdir()
        return ["validate", str(_recipe(folder, **changes)), *(extra or [])]
    return setup


def _tiny_bert(folder: Path) -> Path:
    """A 1-layer BERT with a small word-piece vocabulary, saved as transformers saves it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "man", "is", "playing"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    return folder / "bert"


def _bad_utf8_sts(folder: Path) -> list[str]:
    bert = _tiny_bert(folder)
    sts = folder / "sts"
    shutil.copytree(DATA / "stsbenchmark", sts)
    train = sts / "sts-train.csv"
    data = bytearray(train.read_bytes())
    data[200:201] = b"\xff"
    train.write_bytes(bytes(data))
    return ["run", str(_recipe(folder, task="sts", teacher={"kind": "hf-embedding", "source": str(bert)},
                               student={"derive": {"layers": [0]}}, losses=[{"name": "cosine"}],
                               data={"format": "stsb", "path": str(sts)}))]


def _truncated_gz(folder: Path) -> list[str]:
    _teacher(folder)
    images = folder / "fmnist"
    shutil.copytree(DATA / "fashion-mnist", images)
    for path in images.glob("train-images*.gz"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["run", str(_recipe(folder, data={"path": str(images)}))]


def _output_dir_is_a_file(folder: Path) -> list[str]:
    _teacher(folder)
    (folder / "run").write_text("a file\n")
    return ["run", str(_recipe(folder))]


def _garbage_run_json(folder: Path) -> list[str]:
    _teacher(folder)
    (folder / "run").mkdir()
    (folder / "run" / "run.json").write_text("{garbage")
    return ["run", str(_recipe(folder))]


def _finished(folder: Path) -> Path:
    _teacher(folder)
    path = _recipe(folder)
    subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path)], capture_output=True, cwd=folder,
                   env={**os.environ, "PYTHONPATH": os.environ["CATALOGUE_TREE"]}, check=True)
    return path


def _damaged_checkpoint(folder: Path) -> list[str]:
    _teacher(folder)
    path = _recipe(folder)
    subprocess.run([sys.executable, "-m", "distill.cli", "run", str(path)], capture_output=True, cwd=folder,
                   env={**os.environ, "PYTHONPATH": os.environ["CATALOGUE_TREE"], "DISTILL_KILL_AT_STEP": "7"})
    newest = sorted((folder / "run/train/student/checkpoints").glob("step-*"))[-1]
    weights = next(p for p in newest.iterdir() if p.name.endswith(".safetensors"))
    data = bytearray(weights.read_bytes())
    data[-16:] = b"\xff" * 16
    weights.write_bytes(bytes(data))
    return ["run", str(path)]


def _nan_student(folder: Path, result: subprocess.CompletedProcess) -> str:
    """Whether a student with non-finite weights was saved (and the command said it succeeded)."""
    import torch
    from safetensors.torch import load_file

    saved = folder / "run" / "student" / "model.safetensors"
    if result.returncode != 0 or not saved.is_file():
        return ""
    bad = [k for k, v in load_file(str(saved)).items() if not bool(torch.isfinite(v).all())]
    return f"exit 0 with non-finite weights in {bad[:2]}" if bad else ""


def _export_over_user_files(folder: Path) -> list[str]:
    _finished(folder)
    out = folder / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    return ["export", str(folder / "run"), "--format", "safetensors", "--out", str(out)]


def _user_file_lost(folder: Path, result: subprocess.CompletedProcess) -> str:
    readme = folder / "mine" / "README.md"
    return "" if readme.is_file() and readme.read_text() == "my notes\n" else "the user's README.md overwritten"


def _api_key(folder: Path) -> list[str]:
    (folder / "prompts.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    return ["generate", "--input", str(folder / "prompts.jsonl"), "--output", str(folder / "out.jsonl"),
            "--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"]


def _secret_shown(folder: Path, result: subprocess.CompletedProcess) -> str:
    return "the API key printed" if SECRET in result.stdout + result.stderr else ""


def _nonfinite_training(folder: Path, result: subprocess.CompletedProcess) -> str:
    return "exit 0 after a non-finite run" if result.returncode == 0 else ""


def _tiny_classifier(folder: Path, with_head: bool = True) -> Path:
    """:func:`_tiny_bert` with a 2-class head, saved with it (or not: a plain encoder)."""
    from transformers import BertForSequenceClassification

    bert = _tiny_bert(folder)
    if with_head:
        BertForSequenceClassification.from_pretrained(bert, num_labels=2).save_pretrained(bert)
    return bert


def _csv(folder: Path, rows: list[tuple[str, str]], name: str = "train.csv", bom: bool = False) -> Path:
    data = folder / "texts"
    data.mkdir(exist_ok=True)
    text = "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)
    (data / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return data / name


_ROWS = [("the man is playing", "pos" if i % 2 else "neg") for i in range(40)]


def _text_case(rows: list[tuple[str, str]] | None = None, with_head: bool = True, bom: bool = False,
               **changes) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        bert = _tiny_classifier(folder, with_head)
        path = _csv(folder, _ROWS if rows is None else rows, bom=bom)
        recipe = {"teacher": {"kind": "hf-classifier", "source": str(bert), "max_length": 32},
                  "student": {"derive": {"layers": [0]}}, "data": {"format": "csv", "path": str(path)},
                  "losses": [{"name": "kd"}], "task_loss_weight": 0.5}
        for key, value in changes.items():
            recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
        return ["run", str(_recipe(folder, **recipe))]
    return setup


def _damaged_eval(folder: Path) -> list[str]:
    _finished(folder)
    (folder / "run" / "eval.json").write_text("{\n")
    return ["report", str(folder / "run")]


def _compare_onto_a_run(folder: Path) -> list[str]:
    _finished(folder)
    (folder / "kept.md").write_text((folder / "run" / "report.md").read_text())
    return ["compare", str(folder / "run"), "--out", str(folder / "run")]


def _run_report_lost(folder: Path, result: subprocess.CompletedProcess) -> str:
    report = folder / "run" / "report.md"
    return "" if report.read_text() == (folder / "kept.md").read_text() else "the run's report.md overwritten"


def _exit_zero(what: str) -> Callable[[Path, subprocess.CompletedProcess], str]:
    return lambda folder, result: f"exit 0: {what}" if result.returncode == 0 else ""


def _not_parquet(folder: Path) -> list[str]:
    bert = _tiny_classifier(folder)
    (folder / "data.parquet").write_text("not parquet\n")
    return ["run", str(_recipe(folder, teacher={"kind": "hf-classifier", "source": str(bert)},
                               student={"derive": {"layers": [0]}},
                               data={"format": "parquet", "path": str(folder / "data.parquet")}))]


CASES = [
    Case("recipe", "`temperature: hot` in a loss",
         _validate(losses=[{"name": "kd", "params": {"temperature": "hot"}}])),
    Case("recipe", "`--set train.lr=.inf`", _validate(["--set", "train.lr=.inf"]), wrong=_nonfinite_training),
    Case("recipe", "a loss weight of 1e308", _with_teacher(losses=[{"name": "kd", "weight": 1e308}]),
         wrong=_nonfinite_training),
    Case("recipe", "`seed: -1`", _validate(seed=-1)),
    Case("recipe", "`seed: 2**70`", _validate(seed=2**70)),
    Case("recipe", "`name: ../../x`", _validate(name="../../x")),
    Case("recipe", "`--set` value that is bad YAML", _validate(["--set", "losses=[{name: kd"])),
    Case("recipe", "`--set losses.5.weight=1` (no such item)", _validate(["--set", "losses.5.weight=1"])),
    Case("recipe", "a typo in `arch_args`", _with_teacher(student={"arch": "convnet", "arch_args": {"widht": 2}})),
    Case("paths", "a data path that does not exist", _validate(data={"path": "no/such/folder"})),
    Case("paths", "`output_dir` that is a file", _output_dir_is_a_file),
    Case("run folder", "a garbage `run.json`", _garbage_run_json),
    Case("data", "bad UTF-8 in an STS file", _bad_utf8_sts),
    Case("data", "a truncated `.gz`", _truncated_gz),
    Case("checkpoints", "16 bytes of the newest checkpoint overwritten, then resumed", _damaged_checkpoint,
         wrong=_nan_student),
    Case("export", "`--out` onto a folder with the user's README.md", _export_over_user_files,
         wrong=_user_file_lost),
    Case("secrets", "an API key ending in `\\r`", _api_key, env={"OPENAI_API_KEY": SECRET + "\r"},
         wrong=_secret_shown),
    Case("recipe", "`--set losses.weight=0.3` (a list without an item number)",
         _validate(["--set", "losses.weight=0.3"])),
    Case("text data", "a classifier teacher without a trained head (a plain encoder)", _text_case(with_head=False),
         wrong=_exit_zero("distilled from a random head")),
    Case("text data", "empty label cells in a CSV", _text_case(rows=[*_ROWS, ("a man", "")])),
    Case("text data", "one class in the training file", _text_case(rows=[(t, "pos") for t, _ in _ROWS]),
         wrong=_exit_zero("a one-class classifier reported")),
    Case("text data", "a CSV of 2 rows", _text_case(rows=_ROWS[:2])),
    Case("text data", "a CSV saved with a byte-order mark", _text_case(bom=True)),
    Case("text data", "`max_length` beyond the model's positions, long texts",
         _text_case(rows=[(" ".join(["the man is playing"] * 40), y) for _, y in _ROWS],
                    teacher={"max_length": 1000}, student={"max_length": 1000})),
    Case("data", "a `.parquet` file that is not parquet", _not_parquet),
    Case("run folder", "a damaged `eval.json`, then `distill report`", _damaged_eval),
    Case("run folder", "`compare --out` onto a run's own folder", _compare_onto_a_run, wrong=_run_report_lost),
]


def run_case(case: Case, tree: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(tree), "CATALOGUE_TREE": str(tree), **(case.env or {})}
        os.environ["CATALOGUE_TREE"] = str(tree)
        try:
            argv = case.setup(folder)
        except subprocess.CalledProcessError as exc:
            return {"code": "-", "traceback": False, "message": f"setup failed: {exc}", "wrong": ""}
        result = subprocess.run([sys.executable, "-m", "distill.cli", *argv], capture_output=True, text=True,
                                cwd=folder, env=env, timeout=600)
        lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
        told = [x for x in lines if x.startswith("distill: error")]
        message = told[0] if told else (lines[-1] if lines else "")
        if told and lines[-1].startswith("  "):  # a recipe's list of field errors: show the first
            message += " " + lines[lines.index(told[0]) + 1].strip()
        return {"code": result.returncode, "traceback": "Traceback" in result.stderr,
                "message": message.replace(str(folder), "DIR")[:200],
                "wrong": case.wrong(folder, result) if case.wrong else ""}


def _cell(outcome: dict[str, object]) -> str:
    flag = "traceback; " if outcome["traceback"] else ""
    wrong = f" **wrong: {outcome['wrong']}**" if outcome["wrong"] else ""
    message = str(outcome["message"]).replace("|", "\\|")
    return f"exit {outcome['code']}; {flag}`{message}`{wrong}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an earlier checkout of distill (git worktree add ...)")
    args = parser.parse_args()
    trees = {"after": REPO} | ({"before": args.before.resolve()} if args.before else {})
    outcomes = {name: [run_case(case, tree) for case in CASES] for name, tree in trees.items()}
    names = list(reversed(trees))
    print("| category | case | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i, case in enumerate(CASES):
        print(f"| {case.category} | {case.what} | " + " | ".join(_cell(outcomes[n][i]) for n in names) + " |")
    for name in names:
        rows = outcomes[name]
        print(f"\n{name}: {sum(bool(r['traceback']) for r in rows)} tracebacks, "
              f"{sum(bool(r['wrong']) for r in rows)} wrong results, "
              f"{sum(r['code'] == 2 and not r['traceback'] for r in rows)} one-line errors (exit 2) of {len(rows)}")


if __name__ == "__main__":
    main()
