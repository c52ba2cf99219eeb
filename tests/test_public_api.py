import distill


def test_all_lists_every_public_name():
    public = {name for name in vars(distill) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(distill, name)).__name__ == "module"}
    assert set(distill.__all__) == public - modules


def test_all_names_exist():
    for name in distill.__all__:
        assert hasattr(distill, name)
