"""Who learns the true features: our threshold SAE against SAELens's JumpReLU and BatchTopK on
SAELens's own synthetic ground truth (``sae_lens.synthetic``, the generator of SynthSAEBench),
every SAE scored by SAELens's own ``eval_sae_on_synthetic_data``.

    python -m benchmarks.synthetic_peers [--quick | --ablation] [--settings small,second]
                                         [--seeds 1,2,3] [--device cpu] [--threads 2]

A setting is a ``SyntheticModel`` built with a fixed seed in the pinned SAELens venv of
``benchmarks.saelens_venv``: Zipfian firing, a hierarchy with mutually exclusive children,
low-rank correlations, orthogonalised features. Its training samples are drawn once (a pool,
cached beside the venv) and every SAE trains on the same pool for the same number of samples,
batch size and learning rate, at the same width. Sparsity is matched to the setting's true L0
within ±10%: ours by its L0 controller, SAELens's JumpReLU by a search over its
``l0_coefficient``, BatchTopK by k. Scores come from fresh samples of a fixed evaluation seed.
``synthsaebench-16k`` is the published benchmark's model and protocol (200M fresh samples, a
GPU's work: ``--settings synthsaebench-16k --device cuda``). Each row is appended to
``results/synthetic_peers/<setting>.jsonl`` as it comes, the table with 95% seed intervals to
``benchmarks/RESULTS.md`` at the end. ``--ablation`` trains our recipe with each of its parts
switched back to the previous defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atoms.aip.metric import AIP, SecondMoment, Whitening
from atoms.sae.model import SAEConfig, SparseAutoencoder, build_sae
from atoms.train.batches import TensorBatches, in_geometry
from atoms.train.loop import TrainConfig, Trainer, train_epochs

OUT = Path("results/synthetic_peers")
L0_TOLERANCE = 0.1
EVAL_SEED, PROBE_SEED, POOL_SEED = 12345, 777, 1
AIP_ROWS = 200_000
"""Pool rows S̃ = E[xxᵀ]⁻¹ is estimated from (ours, geometry 'aip')."""


@dataclass(frozen=True)
class Setting:
    """One synthetic model and its training protocol."""

    features: int
    hidden: int
    width: int
    """SAE latents (narrower than ``features``, as SynthSAEBench recommends)."""
    roots: int
    """Hierarchy root nodes (branching 4, depth 3, children mutually exclusive)."""
    exponent: float
    max_prob: float
    min_prob: float
    """Zipfian firing probabilities."""
    rank: int
    correlation: float
    """Low-rank feature correlations."""
    samples: int
    """Training samples per SAE."""
    pool: int
    """Distinct training samples drawn once (0: fresh batches, the published protocol)."""
    eval_samples: int = 50_000
    lr: float = 1e-3
    batch: int = 1024
    magnitudes: tuple[float, float] = (5.0, 4.0)
    """Mean firing magnitude, linear from frequent to rare."""
    seed: int = 42


SETTINGS = {
    "small": Setting(features=2048, hidden=128, width=512, roots=16, exponent=0.5,
                     max_prob=0.4, min_prob=5e-4, rank=8, correlation=0.1,
                     samples=4_000_000, pool=1_000_000),
    "second": Setting(features=3072, hidden=192, width=768, roots=48, exponent=0.8,
                      max_prob=0.5, min_prob=1e-3, rank=16, correlation=0.25,
                      samples=4_000_000, pool=1_000_000, magnitudes=(3.0, 5.0)),
    "synthsaebench-16k": Setting(features=16_384, hidden=768, width=4096, roots=128,
                                 exponent=0.5, max_prob=0.4, min_prob=5e-4, rank=25,
                                 correlation=0.1, samples=200_000_000, pool=0,
                                 eval_samples=500_000, lr=3e-4),
}
QUICK = dataclasses.replace(SETTINGS["small"], samples=3_000_000, eval_samples=20_000)
"""A smoke run: SAELens's JumpReLU needs about 3k steps at lr 1e-3 to move its thresholds from
0.01 to where L0 ≈ 11, so fewer samples would not compare anything."""


# -- our side (no SAELens needed) ------------------------------------------------------------
def our_configs(width: int, hidden: int, target_l0: float, samples: int, lr: float, batch: int,
                geometry: str, seed: int, sae_changes: dict | None = None,
                train_changes: dict | None = None) -> tuple[SAEConfig, TrainConfig]:
    """Our threshold SAE with the project's defaults (and ``*_changes``), steered to
    ``target_l0``."""
    sae = SAEConfig(d_in=hidden, d_sae=width, geometry=geometry, seed=seed,
                    **(sae_changes or {}))
    train = TrainConfig(steps=max(1, samples // batch), batch_size=batch, lr=lr,
                        target_l0=target_l0, seed=seed, log_every=100, **(train_changes or {}))
    return sae, train


PREVIOUS = {"bandwidth": ({"bandwidth": 0.001}, {}),
            "adam_beta1": ({}, {"adam_beta1": 0.0}),
            "lr_schedule": ({}, {"lr_warmup_steps": 100, "lr_decay_fraction": 0.2}),
            "pre_act_loss": ({}, {"pre_act_coeff": 0.0})}
"""What each part of the recipe replaced: the defaults before this benchmark, as (SAE, train)
changes. The recipe: STE bandwidth ε = 0.05 (normalised units; was 0.001), Adam β1 = 0.9 (was
0), a constant learning rate (was 100 warm-up steps and a linear decay over the last 20%), and
the pre-activation loss on latents silent for 25,600 rows, 25 steps (c = 1e-3; was none)."""


def _window(steps: int) -> dict:
    """The train change for a dead window of ``steps`` of the settings' batch."""
    return {"pre_act_window_rows": steps * Setting.batch}


CANDIDATES = {"resampling every 250 steps": ({}, {"resample_every": 250}),
              "resampling every 500 steps": ({}, {"resample_every": 500}),
              **{f"a {n}-step dead window": ({}, _window(n)) for n in (1000, 250, 100, 50, 10)},
              "c = 1e-2 and a 250-step dead window": ({}, {"pre_act_coeff": 1e-2, **_window(250)})}
"""Changes tried on top of the recipe, kept out of it. The dead window was 250 steps until
seeds 0, 10 and 11 showed shorter ones leave no dead latents on 'second' (the settings' batch is
1,024 rows); 25 steps, not 10, for a lower firing-rate floor on real activations."""


def ablations() -> list[tuple[str, dict, dict]]:
    """(name, SAE changes, train changes): the previous defaults, each part of the recipe
    alone on them, the recipe, the recipe without each part, and the recipe with each
    candidate."""
    def merged(parts):
        sae, train = {}, {}
        for part in parts:
            sae.update(PREVIOUS[part][0])
            train.update(PREVIOUS[part][1])
        return sae, train

    rows = [("previous defaults", *merged(PREVIOUS))]
    rows += [(f"previous + {part}", *merged([p for p in PREVIOUS if p != part]))
             for part in PREVIOUS]
    rows.append(("recipe (the defaults now)", {}, {}))
    rows += [(f"recipe − {part}", *merged([part])) for part in PREVIOUS]
    rows += [(f"recipe + {name}", *changes) for name, changes in CANDIDATES.items()]
    return rows


def train_ours(source, sample: torch.Tensor, probe: torch.Tensor, sae_cfg: SAEConfig,
               train_cfg: TrainConfig) -> tuple[SparseAutoencoder, Trainer, float]:
    """Train on ``source`` (``epoch(e)`` yields raw batches) with the L0 controller reading
    ``probe``; ``sample`` rows set the input scale and, under geometry 'aip', S̃ = E[xxᵀ]⁻¹.
    Returns (the SAE in inference form, the trainer, seconds)."""
    sae = build_sae(sae_cfg).to(sample.device)
    whitening = None
    if sae_cfg.geometry == "aip":
        aip = AIP.from_moment(SecondMoment(sae_cfg.d_in).update(sample[:AIP_ROWS].cpu()))
        whitening = Whitening.of(aip)
        sae.set_whitening(whitening)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    sae.fit_input_scale(sample[torch.randperm(len(sample), generator=gen)[:16384]])
    trainer = Trainer(sae, train_cfg)
    trainer.set_l0_probe(probe)
    start = time.perf_counter()
    train_epochs(trainer, in_geometry(source, whitening))
    return sae.inference_form(), trainer, time.perf_counter() - start


# -- the worker (runs inside the SAELens venv) -----------------------------------------------
def _model(s: Setting, device: str):
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    cfg = SyntheticModelConfig(
        num_features=s.features, hidden_dim=s.hidden,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=s.exponent, max_prob=s.max_prob, min_prob=s.min_prob),
        hierarchy=HierarchyConfig(
            total_root_nodes=s.roots, branching_factor=4, max_depth=3,
            mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
            compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=s.rank, correlation_scale=s.correlation),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=s.magnitudes[0], end=s.magnitudes[1]),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5, seed=s.seed)
    return SyntheticModel(cfg, device=device)


def _seeded(seed: int, fn):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _pool(model, s: Setting, name: str) -> torch.Tensor:
    """The setting's training samples, drawn once with ``POOL_SEED`` and cached."""
    from benchmarks.saelens_venv import SAELENS, cache_folder

    model_fields = dataclasses.replace(s, samples=0, eval_samples=0, lr=0.0, batch=0)
    digest = hashlib.sha1(repr(dataclasses.astuple(model_fields)).encode()).hexdigest()[:10]
    key = f"{name}-{SAELENS}-{digest}.pt"
    path = cache_folder() / "synthetic-pools" / key
    if path.exists():
        return torch.load(path, weights_only=True).to(model.device)
    chunk = 50_000
    pool = _seeded(POOL_SEED, lambda: torch.cat(
        [model.sample(min(chunk, s.pool - i)) for i in range(0, s.pool, chunk)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(pool.cpu(), tmp)
    tmp.replace(path)
    return pool


class _Batches:
    """Batches for SAELens's trainer: epochs over the pool in a seeded order, or fresh."""

    def __init__(self, model, pool: torch.Tensor | None, batch: int, seed: int):
        self.model, self.pool, self.batch = model, pool, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.at = None, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.pool is None:
            return self.model.sample(self.batch)
        if self.order is None or self.at + self.batch > len(self.pool):
            self.order, self.at = torch.randperm(len(self.pool), generator=self.gen), 0
        self.at += self.batch
        return self.pool[self.order[self.at - self.batch:self.at]]

    def epoch(self, epoch: int):
        """Our trainer's view: endless fresh batches (it stops at its step count)."""
        while True:
            yield next(self)


def _train_saelens(sae, model, pool, s: Setting, seed: int) -> float:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        total_training_samples=s.samples, device=str(model.device), autocast=False,
        lr=s.lr, lr_end=s.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999,
        lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=s.batch,
        dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=_Batches(model, pool, s.batch, seed))
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def _score(sae, model, s: Setting) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    r = _seeded(EVAL_SEED, lambda: eval_sae_on_synthetic_data(
        sae, model.feature_dict, model.activation_generator, num_samples=s.eval_samples,
        batch_size=min(s.eval_samples, 50_000)))
    c = r.classification
    return {"true_l0": r.true_l0, "l0": r.sae_l0, "explained_variance": r.explained_variance,
            "mcc": r.mcc, "uniqueness": r.uniqueness, "f1": c.f1_score,
            "precision": c.precision, "recall": c.recall, "shrinkage": r.shrinkage,
            "dead": int(r.dead_latents)}


def _jumprelu(model, pool, s: Setting, seed: int, coeff: float):
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    torch.manual_seed(seed)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=s.hidden, d_sae=s.width, l0_coefficient=coeff, device=str(model.device)))
    seconds = _train_saelens(sae, model, pool, s, seed)
    return sae, seconds


def _search_jumprelu(model, pool, s: Setting, seed: int, target: float, start: float,
                     log: list) -> tuple[dict, float]:
    """SAELens's JumpReLU at the l0_coefficient whose L0 is within ±10% of ``target``:
    secant steps in (ln c, ln L0) from ``start``, at most 6 trainings; the nearest is kept."""
    tried: list[tuple[float, dict]] = []
    coeff = start
    for _ in range(6):
        sae, seconds = _jumprelu(model, pool, s, seed, coeff)
        row = {**_score(sae, model, s), "seconds": seconds, "l0_coefficient": coeff}
        tried.append((coeff, row))
        log.append(row)
        print(f"  jumprelu seed {seed} coeff {coeff:.4g}: L0 {row['l0']:.2f}", file=sys.stderr,
              flush=True)
        if abs(row["l0"] / target - 1) <= L0_TOLERANCE / 2:
            break
        coeff = _next_coefficient(tried, target)
    coeff, best = min(tried, key=lambda t: abs(math.log(t[1]["l0"] / target)))
    return {**best, "search_runs": len(tried)}, coeff


def _next_coefficient(tried: list[tuple[float, dict]], target: float) -> float:
    """The next l0_coefficient to try (L0 falls as it grows): inside the bracket of the tries
    on either side of ``target``, log–log interpolation (kept off the bracket's ends); without
    one, the nearest try scaled by L0 / target (at most e² either way)."""
    above = [(c, r["l0"]) for c, r in tried if r["l0"] > target]
    below = [(c, r["l0"]) for c, r in tried if r["l0"] <= target]
    if above and below:
        (c1, l1), (c2, l2) = max(above), min(below)
        if c1 < c2:
            f = (math.log(target) - math.log(l1)) / (math.log(l2) - math.log(l1))
            return c1 * (c2 / c1) ** min(0.9, max(0.1, f))
    c, l0 = min(((c, r["l0"]) for c, r in tried), key=lambda t: abs(math.log(t[1] / target)))
    return c * min(math.e**2, max(math.e**-2, l0 / target))


def _batchtopk(model, pool, s: Setting, seed: int, k: int) -> dict:
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(seed)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=s.hidden, d_sae=s.width, k=k, device=str(model.device)))
    seconds = _train_saelens(sae, model, pool, s, seed)
    return {**_score(sae, model, s), "seconds": seconds, "k": k}


def _ours(model, pool, probe, s: Setting, seed: int, target: float, geometry: str,
          sae_changes: dict | None = None, train_changes: dict | None = None) -> dict:
    from sae_lens import SAE

    from atoms.sae.saelens import save_sae

    if pool is None:  # the published protocol: fresh batches, as SAELens's trainer gets
        sample = _seeded(POOL_SEED, lambda: model.sample(AIP_ROWS))
        source = _Batches(model, None, s.batch, seed)
    else:
        sample, source = pool, TensorBatches(pool, s.batch, seed)
    sae_cfg, train_cfg = our_configs(s.width, s.hidden, target, s.samples, s.lr, s.batch,
                                     geometry, seed, sae_changes, train_changes)
    sae, trainer, seconds = train_ours(source, sample, probe, sae_cfg, train_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_sae(sae.cpu(), Path(tmp) / "sae")
        theirs = SAE.load_from_disk(folder, device=str(model.device))
        row = _score(theirs, model, s)
    st = trainer.state
    return {**row, "seconds": seconds, "threshold_scale": st.threshold_scale,
            "final_sparsity_coeff": st.sparsity_coeff}


def _quiet_saelens() -> None:
    """No progress bars from SAELens's trainer and generator: the worker prints a line a run."""
    import sae_lens.synthetic.feature_dictionary as features
    import sae_lens.training.sae_trainer as trainer
    import tqdm

    def silent(*args, **kwargs):
        return tqdm.tqdm(*args, **{**kwargs, "disable": True})

    for module in (trainer, features):
        if hasattr(module, "tqdm"):
            module.tqdm = silent


def worker(args) -> None:
    _quiet_saelens()
    torch.set_num_threads(args.threads)
    for name in args.settings.split(","):
        s = QUICK if args.quick else SETTINGS[name]
        model = _model(s, args.device)
        pool = _pool(model, s, name) if s.pool else None
        probe = _seeded(PROBE_SEED, lambda: model.sample(4096))  # noqa: B023
        target = _seeded(EVAL_SEED, lambda: _score_true_l0(model, s))  # noqa: B023
        print(f"{name}: true L0 {target:.2f}", file=sys.stderr, flush=True)
        coeff = 1.0
        for seed in map(int, args.seeds.split(",")):
            if args.ablation:
                rows = [{"method": "ours_euclidean", "variant": variant,
                         **_ours(model, pool, probe, s, seed, target, "euclidean", sae, train)}
                        for variant, sae, train in ablations()
                        if not args.variants or variant in args.variants.split(",")]
            else:
                best, coeff = _search_jumprelu(model, pool, s, seed, target, coeff, [])
                rows = [{"method": "saelens_jumprelu", **best},
                        {"method": "saelens_batchtopk",
                         **_batchtopk(model, pool, s, seed, max(1, round(target)))}]
                rows += [{"method": f"ours_{g}", **_ours(model, pool, probe, s, seed, target, g)}
                         for g in ("euclidean", "aip")]
            OUT.mkdir(parents=True, exist_ok=True)
            for row in rows:
                row.update(setting=name, seed=seed, target_l0=target, quick=args.quick,
                           matched=abs(row["l0"] / target - 1) <= L0_TOLERANCE)
                print(json.dumps(row), flush=True)
                with (OUT / f"{name}{_tag(args)}.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  {row.get('variant', row['method'])}: L0 {row['l0']:.2f} "
                      f"EV {row['explained_variance']:.4f} MCC {row['mcc']:.4f} "
                      f"dead {row['dead']}", file=sys.stderr, flush=True)


def _score_true_l0(model, s: Setting) -> float:
    acts = model.activation_generator.sample(s.eval_samples)
    return float((acts != 0).sum(1).float().mean())


# -- the driver --------------------------------------------------------------------------------
SCORES = ("l0", "explained_variance", "mcc", "uniqueness", "f1", "shrinkage", "dead", "seconds")


def summarise(rows: list[dict], key: str = "method") -> list[list]:
    """Per (setting, ``key``): seeds, and mean [95% interval] of each score."""
    from atoms.evaluate.stability import interval

    table = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for method in dict.fromkeys(r[key] for r in rows):
            group = [r for r in rows if r["setting"] == setting and r[key] == method]
            if not group:
                continue
            matched = sum(bool(r["matched"]) for r in group)
            cells = [setting, method, len(group), f"{group[0]['target_l0']:.2f}",
                     f"{matched}/{len(group)}"]
            for score in SCORES:
                mean, lo, hi = interval([float(r[score]) for r in group])
                digits = 1 if score in ("dead", "seconds") else 2 if score == "l0" else 4
                span = "" if math.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
                cells.append(f"{mean:.{digits}f}{span}")
            table.append(cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller 'small' setting, one seed: a smoke run")
    parser.add_argument("--settings", default=None,
                        help=f"comma-separated, of {', '.join(SETTINGS)} (default small,second)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 1,2,3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device of the worker")
    parser.add_argument("--fresh-venv", action="store_true", help="rebuild the SAELens venv")
    parser.add_argument("--ablation", action="store_true",
                        help="our recipe's parts on and off (ours only; default seed 0)")
    parser.add_argument("--variants", default="",
                        help="--ablation: only these variants (comma-separated names)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = "0" if args.ablation else "1" if args.quick else "1,2,3"
    if args.settings is None:
        args.settings = "small" if args.ablation or args.quick else "small,second"
    unknown = [n for n in args.settings.split(",") if n not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    if args.worker:
        worker(args)
        return
    from benchmarks.saelens_venv import run_worker

    forwarded = ["--settings", args.settings, "--seeds", args.seeds, "--threads",
                 str(args.threads), "--device", args.device, "--variants", args.variants]
    forwarded += [flag for flag, on in (("--quick", args.quick), ("--ablation", args.ablation))
                  if on]
    stdout = run_worker("benchmarks.synthetic_peers", forwarded, args.fresh_venv)
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    record_table(rows, args)


def _tag(args) -> str:
    return "-quick" if args.quick else "-ablation" if args.ablation else ""


def record_table(rows: list[dict], args) -> None:
    """Append the rows' table to RESULTS.md (the worker has appended each row to
    ``results/synthetic_peers/<setting>.jsonl`` as it came)."""
    from benchmarks.common import record
    from benchmarks.saelens_venv import SAELENS

    tag = _tag(args)
    what = "our recipe's parts" if args.ablation else f"ours vs {SAELENS}"
    notes = ("SAELens's generator and scorer; same pool, samples, width, batch and lr for every "
             "SAE; L0 matched to the true L0 within ±10% (JumpReLU: l0_coefficient search; "
             "BatchTopK: k = round(true L0); ours: L0 controller). Mean and 95% Student-t "
             f"interval over seeds {args.seeds}.")
    key = "variant" if args.ablation else "method"
    flag = tag and " --" + tag[1:]
    record(f"Synthetic ground truth: {what} (benchmarks/synthetic_peers.py{flag})",
           ["setting", key, "seeds", "true L0", "L0 ±10%", *SCORES], summarise(rows, key),
           notes=notes)


if __name__ == "__main__":
    main()
