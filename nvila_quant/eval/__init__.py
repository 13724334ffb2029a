"""Benchmark accuracy through lmms-eval: the model adapter, local tasks, and runs with per-model cached results.

Modules: ``responder`` (answers and log-likelihoods from the runtime, no harness import), ``adapter`` (the lmms-eval
model class, loaded by the harness), ``plugin`` (its entry point; kept light: lmms-eval loads it at import),
``tasks`` (task folders, the offline check), ``runner`` (one model after another, cached), ``scores`` (bootstrap
deltas, changed answers). Nothing is imported here, so the entry point stays cheap.
"""
