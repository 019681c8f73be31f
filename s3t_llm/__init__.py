"""s3t_llm: exact machine unlearning for instruction-tuned Llama models with S3T.

Modules, one concept each:
- ``records``   Alpaca-format records: loading, validation, stable sample ids, prompt formatting.
- ``ledger``    the durable SQLite ledger of samples, their (shard, slice) cells and the deletion journal.
- ``planner``   slice orderings ("sequences") per shard: cyclic rotation, BMS, random.
- ``simulator`` Monte-Carlo deletion-rate simulator and its closed form.
- ``paths``     where shared data, caches and runs live.
- ``cli``       the ``s3t`` command.
"""

__version__ = "0.1.0"
