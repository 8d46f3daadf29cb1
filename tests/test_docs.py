"""The docs stay true to the code: the README's method table is the registry's."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import update_docs  # noqa: E402

import peftkit  # noqa: E402


def test_readme_method_table_is_generated_from_registry():
    text = (ROOT / "README.md").read_text()
    assert update_docs.generated_readme(text) == text, "README.md is out of date: run python tools/update_docs.py"


def test_every_registered_method_is_documented():
    for name, cls in peftkit.METHODS.items():
        assert cls.family and cls.paper and cls.formula, f"{name}: set family, paper and formula on {cls.__name__}"
        assert cls.__doc__ and len(cls.__doc__) > 40, name
        assert getattr(peftkit, cls.__name__) is cls, f"peftkit.{cls.__name__} is not exported"


def test_method_table_merge_column_agrees_with_the_contract_cases():
    from .cases import all_cases

    for case in all_cases():
        cfg = case.config()
        assert type(cfg).mergeable == case.mergeable, f"{case.id}: {type(cfg).__name__}.mergeable disagrees with its case"
