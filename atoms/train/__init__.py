"""Training an SAE: the job (``job``), the step — hand-written (``fast_step``, ``fused_step``) or
autograd — and the loop with its injected evaluator, checkpointer and hooks (``loop``), batch
sources and the held-out split (``batches``), checkpoints (``checkpoint``), the run folder at a
path or URI (``run_folder``), and the plain and Ray Train executors (``run``, ``ray_train``).

May import every stage above it: ``core``, ``store``, ``extract``, ``aip``, ``sae``, ``evaluate``.
"""
