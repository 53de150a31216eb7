"""Gates on the preference metrics (`evaluate.check_gates`): preferenceAccuracy and rewardMargin, higher is better.

rewardMargin is signed (the base model often prefers the rejected answers: a negative margin), so its
minImprovement is a rise by that fraction of the base's magnitude and strictly above the base, not
base x (1 + fraction), which for a negative base would accept a fall."""

from __future__ import annotations

import pytest

from finetune_operator.spec import Gate, Scores
from finetune_trainer.evaluate import check_gates


def test_preference_accuracy_gate_min_and_improvement() -> None:
    gates = [Gate(metric="preferenceAccuracy", min=0.6), Gate(metric="preferenceAccuracy", min_improvement=0.2)]
    base = Scores(preference_accuracy=0.5)
    assert check_gates(Scores(preference_accuracy=0.6), gates, base) == []
    failures = check_gates(Scores(preference_accuracy=0.55), gates, base)
    assert failures == ["preferenceAccuracy 0.55 < min 0.60", "preferenceAccuracy 0.55 < 0.60 (base 0.50 raised by "
                        "minImprovement 0.20)"]


@pytest.mark.parametrize(("before", "after", "passes"), [
    (-0.4, -0.3, True),     # limit -0.4 + 0.2 x 0.4 = -0.32: reached
    (-0.4, -0.35, False),   # risen, but by less than 20% of 0.4
    (-0.4, -0.44, False),   # base x 1.2 would have accepted this fall
    (0.0, 0.01, True),      # a base margin of 0: any strict rise
    (0.0, 0.0, False),
    (0.5, 0.6, True),       # a positive base: the usual relative rise (limit 0.6)
    (0.5, 0.59, False),
])
def test_reward_margin_improvement_over_a_signed_base(before: float, after: float, passes: bool) -> None:
    failures = check_gates(Scores(reward_margin=after), [Gate(metric="rewardMargin", min_improvement=0.2)],
                           Scores(reward_margin=before))
    assert (failures == []) == passes, failures
    if not passes:
        assert failures[0].startswith("rewardMargin")


def test_an_unmeasured_preference_metric_fails_its_gate() -> None:
    assert check_gates(Scores(), [Gate(metric="rewardMargin", min=0.0)]) == [
        "rewardMargin was not measured (gate: min 0.00)"]
