"""What a user is told: one line, exit status 2, the file or field named; never a traceback."""

from __future__ import annotations

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
