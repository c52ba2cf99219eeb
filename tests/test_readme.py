"""The README's examples run: the Python API snippet on real Fashion-MNIST data, the recipes it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_api_example_runs_and_the_student_learns(tmp_path, data_dir, monkeypatch):
    from distill.config import DataSpec
    from distill.models.zoo import ConvNet
    from distill.tasks import ClassificationTask

    (block,) = [b for b in _python_blocks() if "fit(train_loader, eval_loader)" in b]
    snippet = block[block.index("distill.Distiller("):]
    task = ClassificationTask(DataSpec(format="fashion-mnist", path=data_dir / "fashion-mnist", train_limit=4096,
                                       test_limit=512))
    batches = (task.train.batch(range(i, i + 128)) for i in range(0, 4096, 128))
    train = [(b["inputs"]["x"], b["labels"]) for b in batches]
    test = task.splits["test"]
    evaluation = [(b["inputs"]["x"], b["labels"]) for b in (test.batch(range(i, i + 128)) for i in range(0, 512, 128))]
    torch.manual_seed(0)
    teacher, student = ConvNet(width=8), ConvNet(width=4)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=5e-3)
    for _ in range(2):  # a teacher that knows something: two epochs on the same images
        for x, y in train:
            torch.nn.functional.cross_entropy(teacher(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    monkeypatch.chdir(tmp_path)
    namespace = {"distill": __import__("distill"), "teacher": teacher, "student": student,
                 "train_loader": train, "eval_loader": evaluation}
    result = eval(snippet.strip(), namespace)  # noqa: S307 - the README's own example
    assert result["steps"] == 96 and (tmp_path / "runs/my-student").is_dir()
    accuracy = result["eval"][-1]["accuracy"]
    assert accuracy > 25  # ten classes: chance is 10


def test_the_save_run_example_writes_a_run_folder_the_commands_take(tmp_path, data_dir, tiny_bert, monkeypatch):
    from transformers import AutoTokenizer, BertForSequenceClassification

    import distill
    from distill.cli import main
    from distill.data import read_labelled

    (block,) = [b for b in _python_blocks() if "save_run(" in b]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts, raw = read_labelled(data_dir / "trec" / "train.txt", "labelled-text", encoding="latin-1")
    names = sorted(set(raw))
    enc = tokenizer(texts[:256], padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([names.index(label) for label in raw[:256]])
    train = [{"input_ids": enc["input_ids"][i : i + 32], "attention_mask": enc["attention_mask"][i : i + 32],
              "labels": labels[i : i + 32]} for i in range(0, 256, 32)]
    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(names))
    student = distill.derive(teacher, tokenizer, layers=[1])
    monkeypatch.chdir(tmp_path)
    code = block.replace("../shared/data/trec", str(data_dir / "trec"))
    exec(code, {"distill": distill, "teacher": teacher, "student": student, "train_loader": train,  # noqa: S102
                "tokenizer": tokenizer})
    run = tmp_path / "runs" / "my-trec"
    models = json.loads((run / "eval.json").read_text())["models"]
    assert set(models) == {"teacher", "student"} and models["student"]["parameters"] < models["teacher"]["parameters"]
    assert (run / "report.md").is_file() and main(["export", str(run), "--format", "onnx"]) == 0


def test_every_recipe_the_readme_names_exists():
    named = set(re.findall(r"recipes/[\w.-]+\.yaml", README.read_text()))
    assert named and all((README.parent / r).is_file() for r in named)


def test_the_stages_example_is_a_valid_two_stage_recipe():
    import yaml

    from distill.config import parse_recipe

    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if "stages:" in b]
    recipe = yaml.safe_load((README.parent / "recipes/minilm-general.yaml").read_text())
    recipe.update(yaml.safe_load(block))
    general, sts = parse_recipe(recipe).stage_recipes()
    assert general.task == "embedding" and sts.task == "sts" and sts.task_loss_weight == 1.0
    assert sts.student.source == str(general.run_dir() / "student")


def test_the_demo_data_overrides_reach_both_stages(tmp_path):
    from distill.config import load_recipe

    text = " ".join(README.read_text().split())
    command = re.search(r"`\.venv/bin/distill run (recipes/demo-minilm-sts\.yaml (?:--set \S+ ?)+)`", text).group(1)
    recipe_path, *sets = command.split(" --set ")
    brown, stsb = tmp_path / "brown.txt", tmp_path / "stsb"
    values = {"/your/brown-sentences.txt": str(brown), "/your/stsbenchmark": str(stsb)}
    overrides = [re.sub(r"/your/\S+", lambda m: values[m.group(0)], s) for s in sets]
    general, sts = load_recipe(README.parent / recipe_path.strip(), overrides).stage_recipes()
    assert general.data.path == brown and sts.data.path == stsb and sts.data.format == "stsb"


def test_the_unlabelled_texts_example_mixes_brown_into_the_sst2_recipe(data_dir):
    from distill.config import load_recipe
    from distill.tasks import build_task

    text = " ".join(README.read_text().split())
    command = re.search(r"`distill run (recipes/sst2\.yaml --set '(data\.mix=[^']+)' --set (\S+))`", text)
    mix = command.group(2).replace("../shared/data", str(data_dir))
    recipe = load_recipe(README.parent / command.group(1).split()[0],
                         [mix, command.group(3), f"data.path={data_dir / 'sst2'}"])
    task = build_task(recipe.task, recipe.data)
    # The labelled sentences first, then a quarter of Brown's, which only the teacher labels.
    assert task.labelled_examples == 6920 and len(task.train) - 6920 == 13440
    assert set(task.train.labels[6920:].tolist()) == {-1} and recipe.baseline
