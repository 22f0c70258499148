"""Where artefacts live: folders or storage URIs (``s3://``, ``gs://``, any pyarrow filesystem)
with atomic writes and node-local mirrors (``storage``), a study's result rows (``results``), and
the Ray environment every Ray-using stage starts or joins (``ray_env``).

May import ``atoms.core``.
"""
