"""The atomic inner product S̃ = E[mmᵀ]⁻¹: moments, whitening and AIP products (``metric``),
the second moment of a layer's shards on Ray (``ray_moment``), the S̃ file of a layer folder
(``fit``), the representation shift (``shift``) and the data plane's config (``data_plane``).

May import ``atoms.core``, ``atoms.store`` and ``atoms.extract``.
"""
