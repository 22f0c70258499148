"""From text to activation shards: models by hub id or built-in name (``models``), corpora and
token windows (``corpus``), hooks at the residual stream and MLP sites (``hooks``), the shard
set and its manifest at a path or URI (``shards``, ``shard_store``), one shard's extraction and
resume bookkeeping (``extraction``), and the Ray Data actor pool (``ray_extract``).

May import ``atoms.core`` and ``atoms.store``.
"""
