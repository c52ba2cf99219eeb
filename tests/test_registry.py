import pytest

from distill.errors import RecipeError
from distill.registry import Registry


def test_refuses_duplicates_and_lists_known_names():
    reg: Registry[int] = Registry("thing")
    reg.add("alpha", 1)
    reg.add("beta", 2)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", 3)
    with pytest.raises(RecipeError, match="unknown thing 'alpa'; did you mean 'alpha'\\? known: alpha, beta"):
        reg.get("alpa")
    assert reg.get("beta") == 2 and reg.names() == ["alpha", "beta"]
