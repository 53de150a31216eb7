"""Glue between the training run and `evaluate.py`: score the model now, compare, check gates.

The scores of one model are the generation scores from `evaluate.evaluate_model` (accuracy, terminology,
hallucination, format compliance) on the test set, plus the test set's mean token loss and perplexity
computed here with the training loss (same masking: answer tokens only). With `evaluation.enabled: false`
only the loss and perplexity are measured. Every process computes the same scores on the same examples
(under FSDP the forward passes are collective), and rank 0 reports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_operator.spec import EvaluationStatus, Scores

if TYPE_CHECKING:
    from finetune_trainer.train import Run


def _examples(run: Run) -> list[Any]:
    from finetune_trainer import evaluate

    return [evaluate.EvalExample(prompt=i.prompt, reference=i.reference, context=i.context)
            for i in run.inputs.eval_items]


def score(run: Run, label: str) -> dict[str, Any]:
    """Scores of the model as it is now, as a JSON-able dict (it is kept in checkpoints)."""
    import logging

    from finetune_trainer.train import mean_loss

    model = run.accelerator.unwrap_model(run.model)
    scores = Scores()
    was_training = model.training
    model.eval()
    try:
        if run.spec.evaluation.enabled and run.inputs.eval_items:
            from finetune_trainer import evaluate

            glossary = evaluate.load_glossary(run.inputs.glossary) if run.inputs.glossary else None
            scores = evaluate.evaluate_model(model, run.tokenizer, _examples(run), run.spec.evaluation, glossary)
        loss = mean_loss(model, run.inputs.test, run.hp.batch_size, run.tokenizer.pad_token_id,
                         run.accelerator.device)
    finally:
        model.train(was_training)
    if loss is not None:
        from finetune_trainer.evaluate import perplexity_from_loss

        scores.eval_loss = loss
        scores.perplexity = perplexity_from_loss(loss)
    logging.getLogger(__name__).info("%s model: %s", label, scores.wire())
    return scores.model_dump(mode="json")


def evaluation_status(run: Run, base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> EvaluationStatus:
    """Base beside fine-tuned (`tuned` None: not measured yet), with the gates checked on `tuned`."""
    from finetune_trainer import evaluate

    gates = run.spec.evaluation.gates if tuned is not None else None
    status = evaluate.compare(Scores.model_validate(base or {}), Scores.model_validate(tuned or {}),
                              len(run.inputs.eval_items) if run.spec.evaluation.enabled else len(run.inputs.test),
                              gates=gates)
    if not run.spec.evaluation.enabled:
        status.accuracy_metric = ""  # nothing was generated: loss and perplexity only
    return status
