"""`handlers.spec_digest` and `changed_spec_fields`: how the FineTuneJob event handler tells a spec change
(a pass; fields other than spec.suspend named in a SpecImmutable warning) from its other events."""

from __future__ import annotations

from finetune_operator.handlers import changed_spec_fields, spec_digest

SPEC = {"baseModel": {"name": "llama-7b", "uri": "s3://m/"}, "method": "lora", "suspend": False,
        "hyperparameters": {"epochs": 3, "learningRate": 0.0002}}


def test_the_same_spec_gives_the_same_digest_whatever_the_key_order() -> None:
    reordered = {"hyperparameters": {"learningRate": 0.0002, "epochs": 3}, "suspend": False, "method": "lora",
                 "baseModel": {"uri": "s3://m/", "name": "llama-7b"}}
    assert spec_digest(SPEC) == spec_digest(reordered)
    assert changed_spec_fields(spec_digest(SPEC), spec_digest(reordered)) == []


def test_changed_added_and_removed_fields_are_named() -> None:
    after = {**SPEC, "suspend": True, "hyperparameters": {"epochs": 4, "learningRate": 0.0002},
             "quantization": {"bits": 4}}
    del after["method"]
    assert spec_digest(after) != spec_digest(SPEC)
    assert changed_spec_fields(spec_digest(SPEC), spec_digest(after)) == [
        "spec.hyperparameters", "spec.method", "spec.quantization", "spec.suspend"]


def test_a_nested_change_changes_its_top_level_field_only() -> None:
    after = {**SPEC, "baseModel": {"name": "llama-7b", "uri": "s3://other/"}}
    assert changed_spec_fields(spec_digest(SPEC), spec_digest(after)) == ["spec.baseModel"]


def test_no_spec_is_an_empty_digest() -> None:
    assert spec_digest(None) == () == spec_digest("not a mapping")
    assert changed_spec_fields((), spec_digest({"method": "lora"})) == ["spec.method"]
