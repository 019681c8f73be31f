"""s3t_llm: exact machine unlearning for instruction-tuned Llama models with S3T.

Modules, one concept each:
- ``records``   Alpaca-format records: loading, validation, stable sample ids, prompt formatting.
- ``ledger``    the durable SQLite ledger of samples, their (shard, slice) cells and the deletion journal.
- ``planner``   slice orderings ("sequences") per shard: cyclic rotation, BMS, random.
- ``simulator`` Monte-Carlo deletion-rate simulator and its closed form.
- ``config``    the typed run configuration (YAML recipes + overrides).
- ``models``    base models: resolving, checking, loading (8-bit/bf16/fp32), tiny test Llamas.
- ``run``       a run directory: config, ledger, plan, block layout, surviving prefixes.
- ``training``  stage training of LoRA blocks with TRL.
- ``adapters``  the adapter store: blocks and materialised prefix adapters.
- ``deletion``  deletion requests: journal, plan, switch, destroy, certify; crash recovery.
- ``serving``   vLLM multi-LoRA server + the S3T gateway; ``vllm_ext`` its worker extension.
- ``evaluation`` a package, one role per module: ``tasks`` (lm-eval tasks), ``scorers`` (HF+PEFT / vLLM,
  held-out loss), ``ensemble`` (metrics, the shard ensemble, a served run), ``audit`` (the unlearning audit
  suite), ``report`` (the plots and tables the demo and the experiment share).
- ``experiment`` the deletion-stream experiment (its typed options: the recipe's ``experiment`` section).
- ``unlearn``   DEL and gradient baselines: approximate unlearning, no guarantee.
- ``paths``     where shared data, caches and runs live.
- ``cli``       the ``s3t`` command.
"""

__version__ = "0.1.0"
