"""Evaluation: SaLEM/MEND edit metrics, CounterFact metrics, fluency and perplexity.

Every definition is in the docstring of its module:
`metrics` (EA, token accuracy, adapt accuracy, drawdown, locality, `evaluate_edit`),
`counterfact` (ES, EM, PS, PM, NS, NM, Score), `fluency` (n-gram entropy),
`perplexity` (sliding-window perplexity of plain text).

The functions `fluency.fluency` and `perplexity.perplexity` share their module's name, so
they are not re-exported here (that would hide the modules): import them from the modules.
"""

from salem_jax.eval.counterfact import PromptProbs, counterfact_metrics, evaluate_counterfact
from salem_jax.eval.fluency import generation_fluency, ngram_entropy
from salem_jax.eval.metrics import BaseScores, base_scores, compare_rows, evaluate_edit, score_rows
from salem_jax.eval.perplexity import Perplexity, perplexity_change

__all__ = [
    "PromptProbs",
    "counterfact_metrics",
    "evaluate_counterfact",
    "generation_fluency",
    "ngram_entropy",
    "BaseScores",
    "base_scores",
    "compare_rows",
    "evaluate_edit",
    "score_rows",
    "Perplexity",
    "perplexity_change",
]
