"""Glue between the training run and `evaluate.py`: score the model now, compare, check gates.

The scores of one model are the generation scores from `evaluate.evaluate_model` (accuracy, terminology,
hallucination, format compliance) on the test set, plus the test set's mean token loss and perplexity
computed here with the training loss (same masking: answer tokens only). With `evaluation.enabled: false`
only the loss and perplexity are measured. Every process computes the same scores on the same examples
(under FSDP the forward passes are collective), and rank 0 reports them.

Preference pairs (objective dpo, or `evaluation.preferenceTestSet`): the held-out pairs' preference accuracy
(share of pairs with a positive margin), mean reward margin and count, with the reference-free implicit
reward `beta * log p(response)` (summed over the response's tokens): margin `beta * (log p(chosen) -
log p(rejected))`, beta from spec.dpo. Reference-free because the scores compare models (base beside
fine-tuned, one stage of a chain beside the next): a reference-relative margin is 0 for the reference itself
by construction. What DPO optimizes, the margin against its reference, is logged per step in metrics.jsonl.
For dpo the domain scores (and the test loss) need `evaluation.testSet` (instruction data); without it only
the preference scores are measured.

With `spec.retrieval` every model is scored twice: on the plain test prompts and on the same prompts with
their top-k passages (`EvaluationStatus.withRetrieval`); the gates then check the scores with retrieval,
the setting the model was trained for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_operator.spec import EvaluationStatus, RetrievalScores, Scores

if TYPE_CHECKING:
    from finetune_trainer.runtypes import RunContext as Run


#: Key of the with-retrieval scores in the dict `score` returns (kept in checkpoints as it is).
WITH_RETRIEVAL = "withRetrieval"


def _examples(items: list[Any]) -> list[Any]:
    from finetune_trainer import evaluate

    return [evaluate.EvalExample(prompt=i.prompt, reference=i.reference, context=i.context) for i in items]


def _preference(run: Run, model: Any, scores: Scores) -> None:
    """The held-out pairs' preference scores into `scores` (see the module docstring)."""
    pairs = run.inputs.preference_test
    if not pairs:
        return
    from finetune_trainer.objectives import dpo
    from finetune_trainer.objectives.build import dpo_settings

    result = dpo.evaluate_pairs(model, pairs, dpo.ZeroReference(), dpo_settings(run.spec), run.hp.batch_size,
                                run.tokenizer.pad_token_id, run.accelerator.device, run.method.selective_logits)
    scores.preference_accuracy, scores.reward_margin, scores.preference_pairs = \
        result.accuracy, result.margin, result.pairs


def _scores(run: Run, model: Any, items: list[Any], test: list[Any], preference: bool = False) -> Scores:
    from finetune_trainer.objectives.sft import mean_loss

    scores = Scores()
    if run.spec.evaluation.enabled and items:
        from finetune_trainer import evaluate

        glossary = evaluate.load_glossary(run.inputs.glossary) if run.inputs.glossary else None
        scores = evaluate.evaluate_model(model, run.tokenizer, _examples(items), run.spec.evaluation, glossary)
    loss = mean_loss(model, test, run.hp.batch_size, run.tokenizer.pad_token_id, run.accelerator.device,
                     run.method.selective_logits)
    if loss is not None:
        from finetune_trainer.evaluate import perplexity_from_loss

        scores.eval_loss = loss
        scores.perplexity = perplexity_from_loss(loss)
    if preference:
        _preference(run, model, scores)
    return scores


def score(run: Run, label: str) -> dict[str, Any]:
    """Scores of the model as it is now, as a JSON-able dict (it is kept in checkpoints); with retrieval,
    the scores with passages under WITH_RETRIEVAL."""
    import logging

    model = run.accelerator.unwrap_model(run.model)
    was_training = model.training
    model.eval()
    try:
        scores = _scores(run, model, run.inputs.eval_items, run.inputs.test, preference=True)
        rag = _scores(run, model, run.inputs.rag_eval_items, run.inputs.rag_test) \
            if run.inputs.retrieval is not None else None
    finally:
        model.train(was_training)
    logger = logging.getLogger(__name__)
    logger.info("%s model: %s", label, scores.wire())
    result = scores.model_dump(mode="json")
    if rag is not None:
        logger.info("%s model with retrieval: %s", label, rag.wire())
        result[WITH_RETRIEVAL] = rag.model_dump(mode="json")
    return result


def evaluation_status(run: Run, base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> EvaluationStatus:
    """Base beside fine-tuned (`tuned` None: not measured yet), with the gates checked on `tuned` (with
    retrieval: on the tuned scores with retrieval)."""
    from finetune_trainer import evaluate

    base, tuned = dict(base or {}), (dict(tuned) if tuned is not None else None)
    rag_base, rag_tuned = base.pop(WITH_RETRIEVAL, None), (tuned or {}).pop(WITH_RETRIEVAL, None)
    gates = run.spec.evaluation.gates if tuned is not None else None
    examples = len(run.inputs.eval_items) if run.spec.evaluation.enabled else len(run.inputs.test)
    if not examples and not run.inputs.test:  # dpo without an instruction test set: the pairs were scored
        examples = len(run.inputs.preference_test)
    status = evaluate.compare(Scores.model_validate(base), Scores.model_validate(tuned or {}), examples,
                              gates=None if run.inputs.retrieval is not None else gates)
    if run.inputs.retrieval is not None:
        status.with_retrieval = RetrievalScores(base=Scores.model_validate(rag_base or {}),
                                                tuned=Scores.model_validate(rag_tuned or {}))
        # Preference pairs are scored without passages (an sft job's preferenceTestSet): the same scores stand in
        # the with-retrieval rows, which the gates check.
        for rag_scores, plain in ((status.with_retrieval.base, status.base), (status.with_retrieval.tuned, status.tuned)):
            for name in ("preference_accuracy", "reward_margin", "preference_pairs"):
                if getattr(rag_scores, name) is None:
                    setattr(rag_scores, name, getattr(plain, name))
        if gates:
            failed = evaluate.check_gates(status.with_retrieval.tuned, gates, base=status.with_retrieval.base)
            status.gates_passed = not failed
            status.failed_gates = [f"{message} (with retrieval)" for message in failed][:16]
    if not run.spec.evaluation.enabled or not run.inputs.eval_items:
        status.accuracy_metric = ""  # nothing was generated: loss and perplexity (or preference scores) only
    return status
