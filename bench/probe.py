"""``python -m bench.probe [--n 20000] [--dim 1024] [--classes 13] [--backend sklearn torch]``

Wall time of the evaluation probes on random features with a planted class structure:
kNN (k = 1, 20) and logistic regression with the default C sweep, for each backend (its
``fit_s`` follows one small warm-up fit, ``warmup_s``, which pays for the device's start-up).
With ``--ckpt`` and ``--data`` it also measures feature extraction images/s, and how many
images/s the evaluation loader alone delivers with the same workers (decode, resize, pad,
normalise, collate): when the two are close, the loader bounds the extraction, not the
model. ``--ckpt none --arch vit_small`` times an untrained backbone; ``--skip-probes``
measures the extraction only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import emit
from dinov2_hier.cli import run_cli
from eval.probes import KNNProbe, LogRegProbe, balanced_accuracy


def planted_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs with unit noise; class means ~N(0, s^2 I) with s = 2.5 / sqrt(2 dim), so
    two means lie about 2.5 noise units apart whatever the dimension (a probe task that is
    neither trivial nor hopeless). Labels are strings ``c0, c1, ...``."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32) * (2.5 / np.sqrt(2 * dim))
    y = rng.integers(0, classes, size=n)
    X = means[y] + rng.normal(size=(n, dim)).astype(np.float32)
    return X, np.array([f"c{i}" for i in y])


def time_probe(probe, X_train, y_train, X_test, y_test) -> dict:
    t0 = time.perf_counter()
    probe.fit(X_train, y_train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = probe.predict(X_test)
    return {"fit_s": fit_s, "predict_s": time.perf_counter() - t0, "balanced_accuracy": balanced_accuracy(y_test, pred)}


def time_extraction(ckpt: str, data: str, device: str, batch_size: int, workers: int,
                    arch: str | None = None) -> dict:
    """Images/s of :func:`eval.features.extract_features` over every image of ``data``
    (after a one-batch warm-up that pays for the device's start-up), then of its loader
    alone. Both include starting the loader's workers, as a real extraction does."""
    import torch

    from dinov2_hier.cpu import loader_workers
    from dinov2_hier.data import EvalTransform, records_from_source
    from eval.features import eval_image_loader, extract_features, load_eval_backbone

    backbone = load_eval_backbone(ckpt, arch=arch, device=device)
    paths = [r.path for r in records_from_source(data)]
    extract_features(backbone, paths[:batch_size], batch_size=batch_size, progress=False)
    t0 = time.perf_counter()
    feats = extract_features(backbone, paths, batch_size=batch_size, num_workers=workers, cache_dir=None,
                             progress=False)
    elapsed = time.perf_counter() - t0
    meta, dev = backbone.meta, backbone.device
    transform = EvalTransform(meta["img_size"], "pad", meta["mean"], meta["std"])
    t0 = time.perf_counter()
    for _ in eval_image_loader(paths, transform, batch_size=batch_size, num_workers=workers,
                               pin_memory=dev.type == "cuda"):  # as extract_features loads them
        pass
    loader_s = time.perf_counter() - t0
    return {"images": len(paths), "unreadable": feats.n_unreadable, "seconds": elapsed,
            "images_per_s": len(paths) / elapsed, "loader_seconds": loader_s, "loader_images_per_s": len(paths) / loader_s,
            "arch": meta["arch"], "crop": int(meta["img_size"]), "dim": int(feats.features.shape[1]),
            "batch_size": int(batch_size), "workers": loader_workers(workers, "feature extraction"),  # as used
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n\n")[1])
    parser.add_argument("--n", type=int, default=20000, help="feature vectors (80%% train, 20%% test)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=13)
    parser.add_argument("--backend", nargs="+", default=["sklearn", "torch"], choices=["sklearn", "torch"])
    parser.add_argument("--device", default=None,
                        help="device of the torch probe backend and of the extraction (default: cuda if available)")
    parser.add_argument("--ckpt", default=None, help="also time feature extraction with this checkpoint "
                        "('none': an untrained --arch backbone) ...")
    parser.add_argument("--data", default=None, help="... on this manifest / ImageFolder")
    parser.add_argument("--arch", default=None, help="backbone for --ckpt none (vit_small, vit_large, ...)")
    parser.add_argument("--skip-probes", action="store_true", help="time the extraction only (needs --ckpt, --data)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.skip_probes and not (args.ckpt and args.data):
        parser.error("--skip-probes measures the extraction only: give --ckpt and --data")

    def run() -> None:
        result = {} if args.skip_probes else run_probes(args)
        if args.ckpt and args.data:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            result["extraction"] = time_extraction(args.ckpt, args.data, device, args.batch_size, args.workers,
                                                   args.arch)
        emit(result, args.json)

    return run_cli(run)


def run_probes(args: argparse.Namespace) -> dict:
    """kNN and logistic regression timings on planted features (the module's docstring)."""
    X, y = planted_features(args.n, args.dim, args.classes)
    cut = int(0.8 * args.n)
    result: dict = {"n": args.n, "dim": args.dim, "classes": args.classes}
    for k in (1, 20):
        result[f"knn_k{k}"] = time_probe(KNNProbe(k), X[:cut], y[:cut], X[cut:], y[cut:])
    for backend in args.backend:
        device = args.device if backend == "torch" else None
        t0 = time.perf_counter()  # warm-up: CUDA context and cuBLAS handles, as after extraction
        LogRegProbe(C=1.0, backend=backend, device=device).fit(X[:100], y[:100])
        warmup_s = time.perf_counter() - t0
        probe = LogRegProbe(backend=backend, device=device)
        result[f"logreg_{backend}"] = time_probe(probe, X[:cut], y[:cut], X[cut:], y[cut:])
        result[f"logreg_{backend}"]["warmup_s"] = warmup_s
        result[f"logreg_{backend}"]["chosen_C"] = probe.chosen_C_
        result[f"logreg_{backend}"]["converged"] = probe.converged_
    if "logreg_sklearn" in result and "logreg_torch" in result:
        s, t = result["logreg_sklearn"], result["logreg_torch"]
        result["logreg_speedup_torch_vs_sklearn"] = s["fit_s"] / t["fit_s"]
        result["logreg_accuracy_gap_points"] = 100 * (t["balanced_accuracy"] - s["balanced_accuracy"])
    return result


if __name__ == "__main__":
    sys.exit(main())
