"""Held-out evaluation of an SAE: R² (four variants), L0, dead fraction, threshold statistics."""

from __future__ import annotations

import torch

from atoms.aip.metric import AIP
from atoms.evaluate.metrics import R2Accumulator, dead_fraction, l0_summary
from atoms.sae.model import SparseAutoencoder


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, rows: torch.Tensor, aip: AIP | None = None,
             batch_rows: int = 4096, prefix: str = "eval_",
             threshold_start: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of ``sae`` on ``rows`` (input units), keys prefixed with ``prefix``.

    r2_<variant> (see R2Accumulator), l0_mean/median/p90/max, empty_fraction, dead_fraction
    (latents that never fire on these rows) and, for threshold SAEs, θ mean/std/min/max in
    normalised units plus mean |θ − θ₀| when ``threshold_start`` is given.
    """
    device = sae.W_dec.device
    r2 = R2Accumulator(sae.cfg.d_in, aip)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    l0s = []
    for start in range(0, len(rows), batch_rows):
        x = rows[start:start + batch_rows].to(device)
        out = sae(x)
        r2.update(x.cpu(), out.recon.float().cpu())
        active = out.codes != 0
        counts += active.sum(0)
        l0s.append(active.sum(1).cpu())
    metrics = {f"r2_{k}": v for k, v in r2.result().items()}
    metrics.update(l0_summary(torch.cat(l0s)))
    metrics["dead_fraction"] = dead_fraction(counts.cpu())
    if hasattr(sae, "threshold"):
        theta = sae.threshold.detach().float().cpu()
        metrics.update(theta_mean=float(theta.mean()), theta_std=float(theta.std()),
                       theta_min=float(theta.min()), theta_max=float(theta.max()))
        if threshold_start is not None:
            metrics["theta_moved"] = float((theta - threshold_start.float()).abs().mean())
    return {f"{prefix}{k}": v for k, v in metrics.items()}
