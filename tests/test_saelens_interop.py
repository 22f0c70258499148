"""Our saved SAE in SAELens itself: ``SAE.load_from_disk`` reads it with its metadata (where it
attaches), and its forward on our rows equals ours. Runs in the throw-away SAELens venv that
``benchmarks/compare_saelens.py`` builds (installed on first use), so it is slow."""

import json
import subprocess

import numpy as np
import pytest
import torch

from atoms.core.config import from_dict
from atoms.sae.saelens import load_sae
from atoms.train.job import TrainJob
from atoms.train.run import train_local
from benchmarks.saelens_venv import venv_python
from tests.shardsets import synthetic_shard_set

pytestmark = pytest.mark.slow

IN_SAELENS = """
import json, sys
import numpy as np, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1], device="cpu")
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], sae(x).numpy())
m = sae.cfg.metadata
print(json.dumps({k: getattr(m, k, None) for k in
                  ("hook_name", "model_name", "context_size", "dataset_path", "prepend_bos")}))
"""


def test_saelens_loads_our_run_with_its_hook_and_the_same_forward(tmp_path):
    data = synthetic_shard_set(tmp_path / "acts" / "resid_post" / "layer_0", rows=4096, shards=4)
    job = from_dict(TrainJob, {
        "run": {"data": str(data), "out": str(tmp_path / "run"), "checkpoint_every": 20,
                "eval_rows": 512},
        "sae": {"d_sae": 64, "bandwidth": 0.1, "init_threshold": 0.3},
        "train": {"steps": 40, "batch_size": 256, "lr": 0.004, "sparsity_coeff": 0.05,
                  "lr_warmup_steps": 5, "sparsity_warmup_steps": 0}})
    metrics = train_local(job, progress=False)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1)) * 2.0
    np.save(tmp_path / "x.npy", x.numpy())
    python = venv_python(fresh=False)
    for folder in (metrics["sae_path"], tmp_path / "run" / "checkpoints" / "step_0000040"):
        done = subprocess.run([python, "-c", IN_SAELENS, str(folder), str(tmp_path / "x.npy"),
                               str(tmp_path / "theirs.npy")], capture_output=True, text=True,
                              check=True)
        meta = json.loads(done.stdout.strip().splitlines()[-1])
        assert meta == {"hook_name": "blocks.0.hook_resid_post", "model_name": "synthetic",
                        "context_size": 64, "dataset_path": "synthetic", "prepend_bos": True}
        assert "No hook found" not in done.stderr
        theirs = torch.from_numpy(np.load(tmp_path / "theirs.npy"))
        with torch.no_grad():
            ours = load_sae(folder)(x).recon
        rel = float((theirs - ours).norm() / ours.norm())
        assert rel <= 1e-5, rel
