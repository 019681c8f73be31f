"""Zero-shot multiple-choice evaluation: tasks (lm-eval's), scorers (HF / vLLM) and the shard ensemble.

Tasks are lm-eval tasks: task YAMLs in ``eval/lm_tasks`` (``s3t_arc_easy``, ``s3t_arc_challenge``, ``s3t_piqa``,
``s3t_boolq``, ``s3t_hellaswag``, ``s3t_winogrande``, ``s3t_openbookqa``, ``s3t_mmlu``: lm-eval's own task
configs over the local benchmark files), lm-eval's shipped tasks, any folder of lm-eval task YAMLs
(``include_path``, and the ``S3T_EVAL_TASKS`` folders, ``os.pathsep``-separated) or a task YAML path.
:mod:`.lm_tasks` resolves and builds them with lm-eval itself and turns every doc into an :class:`Item`
(its requests are lm-eval's own ``(context, continuation)`` pairs). :func:`load_task` is the entry point; the
old task names (``arc_easy``, ``piqa``, ... ``mmlu``) are aliases of the ``s3t_`` tasks
(:data:`.lm_tasks.ALIASES`) and keep their seeded item selection (``limit`` items, ``seed`` 0 by default:
``sorted(random.Random(seed).sample(range(n_total), limit))``) and their name in results.

Scoring follows lm-eval's ``loglikelihood(requests) -> [(logprob, is_greedy)]`` interface with lm-eval's
tokenisation (trailing spaces of the context move to the continuation; context+continuation is encoded
whole and the continuation tokens are those past the encoded context). ``acc_norm`` divides the
log-likelihood by the character length of the choice string as lm-eval 0.4 does (``len(choice)``);
``acc_bytes`` by its UTF-8 byte length (lm-eval's ``acc_bytes``).

The ensemble (the SISA/S3T aggregation over shards) averages, over scorers, the softmax over an item's
choices of the log-likelihoods (``acc``), of the per-character log-likelihoods (``acc_norm``) and of the
per-byte log-likelihoods (``acc_bytes``), and predicts the argmax.

The package has fixed roles, one module each:

- :mod:`.tasks` the data model (:class:`Item`, :class:`Task`), :func:`load_task` / :func:`load_tasks` (names,
  aliases, lm-eval YAMLs) and the lm-eval cross-check runners (:func:`run_lm_eval`, :func:`export_lm_eval_task`);
  :mod:`.lm_tasks` builds the tasks and their metrics with lm-eval itself.
- :mod:`.scorers` lm-eval's ``loglikelihood`` over transformers (+PEFT), the gateway / vLLM's completions API, or
  vLLM in process; :func:`heldout_loss`.
- :mod:`.ensemble` metrics (lm-eval's acc / acc_norm / acc_bytes with their standard errors), the shard ensemble
  (:func:`evaluate`) and the evaluation of a run, served (:func:`evaluate_served`) or stored (:func:`evaluate_offline`).
- :mod:`.audit` the unlearning audit: membership attacks with bootstrap CIs, PrivLeak, forget quality, verbatim
  memorisation (``s3t audit``, the deletion-stream experiment, the unlearning comparison).
- :mod:`.report` the plots and tables that the demo and the experiment share (every point with its standard error).
"""

from .ensemble import (ensemble_probs, evaluate, evaluate_offline, evaluate_served, format_results,
                       item_predictions)
from .scorers import (HFScorer, Scorer, TokenScorer, VLLMCompletionsScorer, VLLMOfflineScorer, encode_pair,
                      heldout_loss)
from .tasks import (METRICS, Item, Task, TaskError, env_include_paths, export_lm_eval_task, list_tasks, load_task,
                    load_tasks, run_lm_eval)

__all__ = [
    "METRICS", "TaskError", "Item", "Task", "Scorer", "TokenScorer", "HFScorer", "VLLMCompletionsScorer",
    "VLLMOfflineScorer", "list_tasks", "load_task", "load_tasks", "env_include_paths", "encode_pair", "heldout_loss",
    "evaluate", "ensemble_probs", "item_predictions", "format_results", "export_lm_eval_task", "run_lm_eval",
    "evaluate_served", "evaluate_offline",
]
