from pathlib import Path

import pytest

from distill.config import load_recipe, parse_recipe
from distill.errors import RecipeError
from distill.runner import build_loss_terms

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

BASE = {
    "name": "t",
    "task": "classification",
    "teacher": {"kind": "torch", "arch": "convnet"},
    "student": {"arch": "convnet", "arch_args": {"width": 4}},
    "data": {"format": "fashion-mnist", "path": "x"},
    "losses": [{"name": "kd", "params": {"temperature": 2}}],
}


def with_(**changes):
    recipe = {**BASE, **changes}
    return recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    build_loss_terms(recipe.losses, "logits")
    assert recipe.name == path.stem


def test_there_are_shipped_recipes():
    assert {"demo-minilm-sts.yaml", "fashion-mnist.yaml"} <= {p.name for p in RECIPES}


def test_typo_names_field_and_suggests():
    with pytest.raises(RecipeError) as err:
        parse_recipe(with_(train={"epoch": 3}))
    assert "train.epoch: unknown field 'epoch'; did you mean 'epochs'?" in str(err.value)


def test_bad_value_names_field_value_and_allowed():
    with pytest.raises(RecipeError) as err:
        parse_recipe(with_(train={"schedule": "cosin"}))
    message = str(err.value)
    assert "train.schedule" in message and "'cosin'" in message and "'cosine'" in message


def test_missing_field():
    recipe = dict(BASE)
    del recipe["data"]
    with pytest.raises(RecipeError, match="data: required field is missing"):
        parse_recipe(recipe)


def test_unknown_loss_suggests_at_validation():
    with pytest.raises(RecipeError, match="losses.0.name: unknown loss 'kld'; did you mean 'kd'"):
        parse_recipe(with_(losses=[{"name": "kld"}]))


def test_losses_may_be_empty_only_with_a_task_loss():
    with pytest.raises(RecipeError, match="nothing to train on"):
        parse_recipe(with_(losses=[]))
    assert parse_recipe(with_(losses=[], task_loss_weight=1.0)).losses == []


def test_unknown_loss_parameter():
    recipe = parse_recipe(with_(losses=[{"name": "kd", "params": {"temprature": 2}}]))
    with pytest.raises(RecipeError, match="did you mean 'temperature'"):
        build_loss_terms(recipe.losses, "logits")


def test_task_and_model_kind_must_fit():
    with pytest.raises(RecipeError, match=r"needs one of \['hf-embedding', 'static-embedding'\]"):
        parse_recipe(with_(task="sts", data={"format": "stsb", "path": "x"}))
    static = {"kind": "static-embedding", "derive": {"hidden_size": 64, "layers": [0]}}
    with pytest.raises(RecipeError, match="static-embedding student has no layers"):
        parse_recipe(with_(task="sts", data={"format": "stsb", "path": "x"}, student=static,
                           teacher={"kind": "hf-embedding", "source": "x"}))


def test_yaml_is_data_only(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_overrides_and_missing_file(tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    recipe = load_recipe(path, ["train.lr=1e-3", "losses.0.weight=0.5", "seed=7"])
    assert (recipe.train.lr, recipe.losses[0].weight, recipe.seed) == (1e-3, 0.5, 7)
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(path, ["train.lr"])
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_identity_ignores_where_and_what_is_kept_not_what_changes_results():
    a = parse_recipe(with_(output_dir="a"))
    assert a.identity() == parse_recipe(with_(output_dir="b")).identity()
    assert a.identity() != parse_recipe(with_(seed=1)).identity()
    kept = parse_recipe(with_(train={**BASE.get("train", {}), "keep_checkpoints": "none"}))
    assert kept.identity() == parse_recipe(with_()).identity()
    # A default written out is the same recipe as one left out.
    same = parse_recipe(with_(data={**BASE["data"], "encoding": "utf-8"}))
    assert same.identity() == parse_recipe(with_()).identity()



def test_resolved_recipe_round_trips():
    import yaml

    recipe = parse_recipe(BASE)
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())) == recipe


def test_a_derived_student_reads_as_many_tokens_as_its_teacher_unless_told():
    base = {"name": "lm", "task": "lm", "teacher": {"kind": "hf-causal-lm", "source": "t", "max_length": 256},
            "student": {"derive": {"layers": [0]}}, "data": {"format": "text", "path": "x"},
            "losses": [{"name": "token_kd"}]}
    assert parse_recipe(base).student.max_length == 256
    assert parse_recipe({**base, "student": {"derive": {"layers": [0]}, "max_length": 64}}).student.max_length == 64
    assert parse_recipe({**base, "student": {"source": "s"}}).student.max_length == 128  # not derived: its own default
