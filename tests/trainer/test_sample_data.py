"""The bundled synthetic healthcare sample: shape, split, reproducibility, facts."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.trainer.conftest import HealthcareSample


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def make_sample(healthcare_sample: HealthcareSample) -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_sample", healthcare_sample.dir / "make_sample.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_files_are_what_the_generator_writes(make_sample: ModuleType, healthcare_sample: HealthcareSample) -> None:
    for name, text in make_sample.generate().items():
        assert (healthcare_sample.dir / name).read_text() == text, f"{name} is stale: run make_sample.py"


def test_sizes_keys_and_split(healthcare_sample: HealthcareSample) -> None:
    train, test = _rows(healthcare_sample.train), _rows(healthcare_sample.test)
    assert 300 <= len(train) <= 500
    assert 40 <= len(test) <= 60
    for row in train + test:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"] and row["output"]
        assert 5 <= len(row["output"].split()) <= 40
    prompts = lambda rows: {(r["instruction"], r["input"]) for r in rows}  # noqa: E731
    assert not prompts(train) & prompts(test)
    assert len(prompts(train)) == len(train)
    total = sum(p.stat().st_size for p in healthcare_sample.dir.iterdir() if p.is_file())
    assert total < 300_000


def test_glossary_terms_occur_in_the_data(healthcare_sample: HealthcareSample) -> None:
    terms = healthcare_sample.glossary.read_text().splitlines()
    assert len(terms) == len(set(terms)) >= 100
    assert all(t == t.strip() and t for t in terms)
    outputs = " ".join(r["output"] for r in _rows(healthcare_sample.train)).lower()
    used = [t for t in terms if t.lower() in outputs]
    assert len(used) / len(terms) > 0.8


def test_answers_follow_the_fact_tables(make_sample: ModuleType, healthcare_sample: HealthcareSample) -> None:
    rows = _rows(healthcare_sample.train) + _rows(healthcare_sample.test)
    checked = 0
    for row in rows:
        match = re.match(r"(.+) usual adult dose is (.+?) (by mouth|intravenously|subcutaneously) (.+), "
                         r"with a maximum of (.+) per day\.$", row["output"])
        if match:
            drug = match.group(1).lower()
            assert make_sample.DRUGS[drug] == (match.group(2), match.group(3), match.group(4), match.group(5))
            checked += 1
        match = re.match(r"The ICD-10-CM code for (.+) is (\S+)\.$", row["output"])
        if match:
            assert make_sample.ICD10[match.group(1)] == match.group(2)
            checked += 1
    assert checked > 100


def test_lab_interpretation_matches_reference_range(
    make_sample: ModuleType, healthcare_sample: HealthcareSample
) -> None:
    pattern = re.compile(r"^(.+?) (-?[\d.]+) ?(\S*) is (low|normal|high) \(reference ([\d.]+)-([\d.]+)")
    seen = set()
    for row in _rows(healthcare_sample.train):
        match = pattern.match(row["output"])
        if not match:
            continue
        value, low, high = float(match.group(2)), float(match.group(5)), float(match.group(6))
        expected = "low" if value < low else "high" if value > high else "normal"
        assert match.group(4) == expected, row
        seen.add(expected)
    assert seen == {"low", "normal", "high"}


def test_every_answer_meets_the_documented_format_regex(healthcare_sample: HealthcareSample) -> None:
    readme = (healthcare_sample.dir / "README.md").read_text()
    regex = re.search(r"formatRegex: '(.+?)'", readme)
    assert regex, "README documents the format regex"
    pattern = re.compile(regex.group(1).replace("\\n", "\n"))
    rows = _rows(healthcare_sample.train) + _rows(healthcare_sample.test)
    assert all(pattern.fullmatch(r["output"]) for r in rows)
    assert not pattern.fullmatch("no capital letter and no period")
