"""Extract activations of a causal LM into checksummed Parquet shards with Ray Data.

    python experiments/extract.py [--config experiments/configs/models/smollm2-135m.yaml]
                                  [--out FOLDER | s3://bucket/prefix]

Rerunning resumes: verified shards are skipped, damaged ones are redone. An ``out`` that cannot
be written fails before any model is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from atoms.aip.data_plane import DataConfig
from atoms.core.cli import config_parser, run
from atoms.core.config import load_yaml
from atoms.extract.ray_extract import run_extraction
from atoms.store.storage import Storage, redact

DEFAULT_MODEL_CONFIG = Path(__file__).with_name("configs") / "models" / "smollm2-135m.yaml"


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__.splitlines()[0], DEFAULT_MODEL_CONFIG, DataConfig).parse_args(argv)
    cfg = load_yaml(DataConfig, args.config)
    if args.out is not None:
        cfg.extract.out = str(args.out)
    Storage(cfg.extract.out).check_writable("out")
    manifests = run_extraction(cfg.extract, progress=not args.quiet)
    for path in manifests:
        print(f"wrote {redact(path)}")


if __name__ == "__main__":
    sys.exit(run(main))
