"""Scores against known atoms, as the SAELens synthetic benchmark reads them (arXiv 2602.14687).

With learned directions L (N, H), true atoms T (M, H), learned codes f and true codes δ:

- mcc: mean |cos| over the Hungarian-matched pairs (min(N, M) of them);
- uniqueness: distinct true atoms among the learned latents' best matches, / N;
- precision / recall / f1: per learned latent, firing (f ≠ 0) as a detector of its best-matched
  true atom's presence (δ > 0), averaged over latents (a dead latent scores 0);
- shrinkage: mean over (row, true atom on the support, matched latent) of the coded coefficient
  along the atom, fⱼ⟨wⱼ, t⟩/⟨t, t⟩ (wⱼ latent j's input-space decoder vector), over δ;
- norm_ratio: mean ‖x̂‖/‖x‖ (what SAELens calls shrinkage);
- recovery_099: fraction of true atoms matched at |cos| > 0.99.
"""

from __future__ import annotations

import numpy as np
import torch

from atoms.aip.metric import AIP
from atoms.core.errors import InputError
from atoms.evaluate.matching import abs_cosines, assign


def ground_truth_scores(learned, true, codes, true_codes, decoder_vectors=None, recon=None,
                        x=None, aip: AIP | None = None) -> dict[str, float]:
    """The scores above; ``decoder_vectors`` (N, H) are needed for shrinkage, ``recon`` and
    ``x`` for norm_ratio. Cosines are Euclidean (as SAELens's); with ``aip`` the AIP MCC too."""
    cos = abs_cosines(learned, true)
    codes, true_codes = torch.as_tensor(codes).double(), torch.as_tensor(true_codes).double()
    if codes.shape != (true_codes.shape[0], cos.shape[0]) or true_codes.shape[1] != cos.shape[1]:
        raise InputError(f"ground truth: codes {tuple(codes.shape)} and true codes "
                         f"{tuple(true_codes.shape)} do not fit {cos.shape[0]} learned and "
                         f"{cos.shape[1]} true directions")
    rows, cols, method = assign(cos)
    out = {"mcc": float(cos[rows, cols].mean()), "matching": method}
    best = cos.argmax(1)
    out["uniqueness"] = float(len(best.unique()) / cos.shape[0])
    out.update(_detection(codes != 0, true_codes[:, best] > 0))
    matched = np.zeros(cos.shape[1])
    matched[cols] = cos[rows, cols].numpy()
    out["recovery_099"] = float((matched > 0.99).mean())
    if aip is not None:
        cos_aip = abs_cosines(learned, true, aip)
        r, c, _ = assign(cos_aip)
        out["mcc_aip"] = float(cos_aip[r, c].mean())
    if decoder_vectors is not None:
        out["shrinkage"] = _shrinkage(codes, true_codes, torch.as_tensor(decoder_vectors),
                                      torch.as_tensor(true), rows, cols)
    if recon is not None and x is not None:
        x, recon = torch.as_tensor(x).double(), torch.as_tensor(recon).double()
        norms = x.norm(dim=1)
        ok = norms > 1e-6
        out["norm_ratio"] = float((recon.norm(dim=1)[ok] / norms[ok]).mean())
    return out


def _detection(fires: torch.Tensor, present: torch.Tensor) -> dict[str, float]:
    tp = (fires & present).sum(0).double()
    fp = (fires & ~present).sum(0).double()
    fn = (~fires & present).sum(0).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), 0.0)
    return {"precision": float(precision.mean()), "recall": float(recall.mean()),
            "f1": float(f1.mean())}


def _shrinkage(codes, true_codes, w, true, rows, cols) -> float:
    """Mean coded / true coefficient on the true support, through the matched latents."""
    w, t = w.double(), true.double()
    latents, atoms = torch.as_tensor(rows), torch.as_tensor(cols)
    along = (w[latents] * t[atoms]).sum(1) / (t[atoms] * t[atoms]).sum(1)  # ⟨wⱼ, t⟩/⟨t, t⟩
    coded = codes[:, latents] * along  # coefficient along each matched true atom
    truth = true_codes[:, atoms]
    on = truth > 0
    if not bool(on.any()):
        return float("nan")
    return float((coded[on] / truth[on]).mean())
