"""Extract activations of a causal LM into checksummed Parquet shards with Ray Data.

    python experiments/extract.py [--config experiments/configs/models/smollm2-135m.yaml]
                                  [--out FOLDER | s3://bucket/prefix]

Rerunning resumes: verified shards are skipped, damaged ones are redone. An ``out`` that cannot
be written fails before any model is loaded.
"""

from __future__ import annotations

import sys

from atoms.core.config import load_yaml
from atoms.extract.ray_extract import run_extraction
from atoms.store.storage import Storage, redact
from experiments.common import config_parser, run
from experiments.data_config import DEFAULT_MODEL_CONFIG, DataConfig


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__.splitlines()[0], DEFAULT_MODEL_CONFIG).parse_args(argv)
    cfg = load_yaml(DataConfig, args.config)
    if args.out is not None:
        cfg.extract.out = str(args.out)
    Storage(cfg.extract.out).check_writable("out")
    manifests = run_extraction(cfg.extract, progress=not args.quiet)
    for path in manifests:
        print(f"wrote {redact(path)}")


if __name__ == "__main__":
    sys.exit(run(main))
