"""bench.official.import_isolated: a checkout whose top-level `models` package shadows ours is
imported without either side seeing the other's modules."""

import sys

import pytest

import models.var.model as our_var_model
from bench.official import import_isolated


def fake_checkout(root):
    (root / "models").mkdir()
    (root / "models" / "__init__.py").write_text("")
    # Their module imports a sibling through the shared top-level name, as the official code does.
    (root / "models" / "var.py").write_text(
        "from models.helpers import ANSWER\n\ndef answer():\n    return ANSWER\n"
    )
    (root / "models" / "helpers.py").write_text("ANSWER = 42\n")
    (root / "dist.py").write_text("DEVICE = 'cpu'\nprint('printed at import')\n")
    return root


def test_their_models_package_does_not_replace_ours(tmp_path, capsys):
    path_before = list(sys.path)
    mods = import_isolated(fake_checkout(tmp_path), ["models.var", "dist"], shadowed=("models", "dist"))

    assert mods["models.var"].answer() == 42  # still works: it holds its own globals
    assert mods["dist"].DEVICE == "cpu"
    assert sys.modules["models.var.model"] is our_var_model
    assert not hasattr(sys.modules["models"], "helpers")
    assert "dist" not in sys.modules
    assert sys.path == path_before
    assert "printed at import" not in capsys.readouterr().out


def test_missing_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        import_isolated(tmp_path / "nowhere", ["models.var"], shadowed=("models",))
