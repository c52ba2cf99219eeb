"""What a user is told: one line, exit status 2, the file or field named; never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

import distill
from distill.cli import main
from distill.config import parse_recipe
from distill.locks import exclusive
from distill.runner import locked

BASE = {"name": "x", "task": "classification", "teacher": {"kind": "torch", "source": "t"},
        "student": {"arch": "mlp"}, "data": {"format": "fashion-mnist", "path": "d"}, "losses": [{"name": "kd"}]}


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", ""])
def test_run_names_that_would_leave_the_runs_folder_are_refused(name):
    with pytest.raises(distill.RecipeError, match="not a plain name"):
        parse_recipe({**BASE, "name": name})


@pytest.mark.parametrize(("field", "value"), [("seed", -1), ("seed", 2**70)])
def test_out_of_range_numbers_are_refused(field, value):
    with pytest.raises(distill.RecipeError, match=field):
        parse_recipe({**BASE, field: value})


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_numbers_are_refused(tmp_path, capsys, value):
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(BASE))
    assert main(["validate", str(path), "--set", f"train.lr={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error:") and "train.lr" in err and "Traceback" not in err


def test_a_run_folder_in_use_is_refused_with_its_holder(tmp_path):
    folder = tmp_path / "run"
    with exclusive(tmp_path / ".run.lock", wait=False):
        with pytest.raises(distill.RunFolderError, match=r"in use by another distill process \(pid \d+ on "):
            with locked(folder):
                pass
    with locked(folder):  # released: free again
        pass


def test_os_errors_are_one_line(tmp_path, capsys):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("::: not yaml :::\n")
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_validate_names_paths_that_do_not_exist(tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "teacher": {"kind": "torch", "source": "./no-teacher"},
                                    "data": {"format": "fashion-mnist", "path": str(tmp_path / "no-data")}}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not found: data.path" in err and "teacher.source no-teacher" in err
    assert f"read from the working directory, {Path.cwd()}; give others with --set data.path=PATH" in err


def test_validate_names_the_stage_of_a_path_that_does_not_exist(tmp_path, capsys):
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "minilm-two-stage.yaml")
    sets = [f"teacher.source={tmp_path}", f"data.path={tmp_path}", "evaluate.suite=[]", "stages.1.data.path=/no/stsb"]
    assert main(["validate", recipe, *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert "not found: stages.1 (sts) data.path /no/stsb" in err and "--set stages.1.data.path=PATH" in err


def _recipe_file(tmp_path, recipe):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(("override", "told"), [
    ("losses=[{name: kd", "--set losses=[{name: kd: the value is not valid YAML"),
    ("losses.5.weight=1", "--set losses.5.weight: there is no item 5; the list has 1"),
    ("losses.weight=0.3", "--set losses.weight: losses is a list; name an item by its number (losses.0.weight)"),
    ("losses.x.weight=1", "--set losses.x.weight: losses is a list; name an item by its number"),
])
def test_bad_overrides_are_one_line(tmp_path, capsys, override, told):
    assert main(["validate", str(_recipe_file(tmp_path, BASE)), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distill: error: {told}") and len(err.strip().splitlines()) == 1


def test_a_loss_parameter_of_the_wrong_type_is_named():
    from distill.pairing import build_loss_terms

    with pytest.raises(distill.RecipeError, match=r"losses.0.params: loss 'kd' cannot take \{'temperature': 'hot'\}"):
        build_loss_terms(parse_recipe({**BASE, "losses": [{"name": "kd", "params": {"temperature": "hot"}}]}).losses,
                         "logits")


def test_a_typo_in_arch_args_is_named_with_a_suggestion():
    from distill.models.adapters import load_torch_classifier

    with pytest.raises(distill.ModelError, match=r"\['widht'\] not accepted; did you mean 'width'\? it takes width"):
        load_torch_classifier("convnet", {"widht": 4}, None)


def test_damaged_data_files_are_named(tmp_path, data_dir):
    import shutil

    from distill.data import read_idx_images, read_records, read_stsb

    shutil.copytree(data_dir / "stsbenchmark", tmp_path / "sts")
    train = tmp_path / "sts/sts-train.csv"
    lines = train.read_bytes().split(b"\n")
    lines[2] = lines[2][:40] + b"\xff" + lines[2][40:]
    train.write_bytes(b"\n".join(lines))
    with pytest.raises(distill.DataError, match=r"sts-train.csv:3: not utf-8 text"):
        read_stsb(tmp_path / "sts", "train")
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(distill.DataError, match=r"r.jsonl:2: not utf-8 text"):
        read_records(tmp_path / "r.jsonl", "jsonl")
    shutil.copytree(data_dir / "fashion-mnist", tmp_path / "fm")
    for gz in (tmp_path / "fm").glob("t10k-images*.gz"):
        gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(distill.DataError, match=r"not a valid gzip file, or truncated"):
        read_idx_images(tmp_path / "fm", "test")


@pytest.mark.parametrize(("changes", "told"), [
    ({"data": {"format": "fashion-mnist", "path": "d", "image_size": 14}},
     "data.image_size: applies to images read from an image-folder"),
    ({"student": {"kind": "hf-classifier", "derive": {"hidden_size": 0}},
      "teacher": {"kind": "hf-classifier", "source": "t"}, "data": {"format": "csv", "path": "d"}},
     "student.derive.hidden_size: Input should be greater than or equal to 1"),
    ({"task": "regression", "teacher": {"kind": "hf-classifier", "source": "t"},
      "student": {"derive": {"layers": [0]}}, "data": {"format": "csv", "path": "d"}, "losses": [{"name": "cosine"}]},
     "losses: cosine on a regression head's one output teaches nothing"),
])
def test_settings_that_would_be_ignored_or_teach_nothing_are_refused(changes, told):
    with pytest.raises(distill.RecipeError, match=told):
        parse_recipe({**BASE, **changes})


@pytest.mark.parametrize(("command", "told"), [
    (["inspect", "-", "--arch", "convnet", "--input-shape=-1,28,28"], "--input-shape: expected C,H,W, three positive"),
    (["inspect", "-", "--arch", "convnet", "--input-shape", "3,28,28"],
     r"- cannot run on inputs \{'x': \(2, 3, 28, 28\)\}: .*channels"),
    (["validate", "RECIPE_DIR"], "is a folder; give the recipe's YAML file"),
    (["validate", "BINARY"], "not UTF-8 text"),
    (["validate", "UNKNOWN_ARCH"], "unknown architecture 'nonet'; did you mean 'convnet'"),
])
def test_commands_name_what_is_wrong_in_one_line(tmp_path, capsys, command, told):
    import yaml

    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00name")
    arch = {**BASE, "data": {"format": "fashion-mnist", "path": str(tmp_path)}, "student": {"arch": "nonet"},
            "teacher": {"kind": "torch", "arch": "convnet"}}
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(arch))
    names = {"RECIPE_DIR": str(tmp_path), "BINARY": str(tmp_path / "binary.yaml"),
             "UNKNOWN_ARCH": str(tmp_path / "arch.yaml")}
    assert main([names.get(part, part) for part in command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error:") and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(told, err), err


def test_export_options_out_of_range_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "runs/x", "--format", "onnx", "--rounds", "0"])
    assert exit_.value.code == 2 and "argument --rounds: expected 1 or more, got 0" in capsys.readouterr().err


def test_overrides_given_as_one_string_are_named():
    told = r"overrides are a list of 'key=value' strings, for example \['seed=1'\]"
    with pytest.raises(distill.RecipeError, match=told):
        distill.run("recipes/fashion-mnist.yaml", "seed=1")


def test_validate_resolves_package_sources(tmp_path, capsys):
    import yaml

    recipe = {**BASE, "task": "sts", "teacher": {"kind": "hf-embedding", "source": "pkg://distill/models"},
              "student": {"derive": {"layers": [0]}}, "data": {"format": "stsb", "path": str(tmp_path)},
              "losses": [{"name": "cosine"}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 0  # an installed package's folder is found
    assert "valid" in capsys.readouterr().out
    recipe["teacher"]["source"] = "pkg://no_such_package_here/model"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 2
    assert "'no_such_package_here' is not installed (pip install no-such-package-here)" in capsys.readouterr().err
