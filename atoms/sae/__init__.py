"""SAEs behind one interface: the threshold (JumpReLU), ReLU + L1 and TopK models and the
closed-form TSAE (``model``), the SAELens layout on disk (``saelens``), and the other layouts —
sparsify, Gemma Scope, Llama Scope — with layout detection (``formats``).

May import ``atoms.core`` and ``atoms.aip``.
"""
