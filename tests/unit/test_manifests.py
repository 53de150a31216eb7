"""Every invalid manifest in the corpus gets a specific, field-named error; valid examples plan cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_operator.manifests import load_file, load_text, validate_document

from .invalid_corpus import CASES, Case

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_the_corpus_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_invalid_manifest_gets_a_field_named_error(case: Case):
    loaded = validate_document(case.manifest(), "case.yaml")
    assert not loaded.ok
    paths = [i.path for i in loaded.issues]
    assert case.path in paths, f"expected an error at {case.path}, got {[str(i) for i in loaded.issues]}"
    issue = next(i for i in loaded.issues if i.path == case.path)
    assert case.fragment in str(issue), str(issue)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path):
    (loaded,) = load_file(path)
    assert loaded.ok, [str(i) for i in loaded.issues]


def test_all_errors_of_a_document_are_reported_at_once():
    doc = CASES[0].manifest()
    doc["spec"]["lora"]["r"] = 0
    doc["spec"]["hyperparameters"]["precision"] = "int8"
    doc["spec"]["output"]["uri"] = "ftp://x/y"
    loaded = validate_document(doc)
    assert {i.path for i in loaded.issues} >= {
        "spec.method",
        "spec.lora.r",
        "spec.hyperparameters.precision",
        "spec.output.uri",
    }


def test_the_value_is_shown_and_long_values_are_cut():
    doc = CASES[0].manifest()
    doc["spec"]["method"] = "x" * 500
    (issue,) = validate_document(doc).issues
    text = str(issue)
    assert "got 'xxx" in text and text.endswith("...)") and len(text) < 200


def test_yaml_errors_give_line_and_column():
    (loaded,) = load_text("apiVersion: [unclosed\n", "broken.yaml")
    (issue,) = loaded.issues
    assert issue.path == "(yaml)" and "line" in issue.message


def test_multi_document_files_validate_each_document():
    good = yaml.safe_dump(CASES[0].manifest() | {"spec": load_file(EXAMPLES[0])[0].job.spec.wire()})  # type: ignore[union-attr]
    bad = yaml.safe_dump(CASES[0].manifest())
    loaded = load_text(good + "---\n" + bad, "two.yaml")
    assert [d.ok for d in loaded] == [True, False]
    assert loaded[1].label.startswith("two.yaml[1]")
