"""Test metrics shared by server pretraining and the FL engine: accuracy, macro-F1, mean loss.

One pass over the whole test set (no ``drop_last``: every sample counts once), the model in eval
mode under ``torch.inference_mode()``, its previous train/eval mode restored afterwards. The loss
is the summed cross-entropy divided once by the number of samples (the reference code averaged
per batch and then divided again). Counts are accumulated on the device and read back once, so a
GPU evaluation synchronises a single time; the result is deterministic for a given model, data
and batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def macro_f1(confusion: np.ndarray) -> float:
    """Macro-averaged F1 of a (K, K) confusion matrix (rows: true class, columns: predicted).

    The average runs over the classes that occur in the labels or in the predictions (the
    scikit-learn default ``labels=None``); a class that is neither predicted nor present does not
    drag the mean down. A present class that is never predicted correctly scores 0.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    seen = (support + predicted) > 0
    if not seen.any():
        return 0.0
    denom = support + predicted  # 2TP + FP + FN
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[seen].mean())


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"evaluate: {name} must be a numpy array or a torch tensor, got "
                    f"{type(x).__name__}")


def evaluate(model: torch.nn.Module, images: Any, labels: Any,
             transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 512,
             device: str | torch.device = "cpu", num_classes: int | None = None
             ) -> dict[str, Any]:
    """Accuracy, macro-F1 and mean cross-entropy of `model` on a labelled set.

    Args:
        model: a classifier already on `device`; its train/eval mode is restored on return.
        images: uint8 (N, H, W, C), numpy or torch (a tensor already on `device` is used in place).
        labels: integer (N,), numpy or torch.
        transform: the non-augmenting :class:`gptfl_hpc.train.transforms.ImageTransform` of the
            dataset (uint8 NHWC -> normalised float NCHW); an augmenting one is refused.
        batch_size: samples per forward pass; the last batch may be smaller (never dropped).
        device: where the forward passes run.
        num_classes: size of the confusion matrix; None takes the model's output width.

    Returns:
        ``{"accuracy": float, "macro_f1": float, "loss": float, "num_samples": int}``.
    """
    if getattr(transform, "augment", False):
        raise ValueError("evaluate: the transform augments; pass "
                         "ImageTransform(..., augment=False)")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    x_all = _as_tensor(images, "images")
    y_all = _as_tensor(labels, "labels").reshape(-1)
    n = int(y_all.shape[0])
    if n == 0 or int(x_all.shape[0]) != n:
        raise ValueError(f"evaluate: need a non-empty set with as many images as labels, got "
                         f"{int(x_all.shape[0])} images and {n} labels")
    lo, hi = int(y_all.min()), int(y_all.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        raise ValueError(f"evaluate: labels outside [0, {num_classes}): min {lo}, max {hi}")
    device = torch.device(device)
    y_all = y_all.to(device=device, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            preds = []
            for start in range(0, n, batch_size):
                xb = x_all[start:start + batch_size].to(device, non_blocking=True)
                yb = y_all[start:start + batch_size]
                logits = model(transform(xb)).float()
                if start == 0:
                    k = int(num_classes) if num_classes is not None else int(logits.shape[1])
                    if int(logits.shape[1]) != k or hi >= k:
                        raise ValueError(f"evaluate: the model outputs {int(logits.shape[1])} "
                                         f"classes for num_classes={k}, labels up to {hi}")
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
                preds.append(logits.argmax(dim=1))
            pred = torch.cat(preds)
            cm = torch.bincount(y_all * k + pred, minlength=k * k).reshape(k, k)
            cm_np = cm.cpu().numpy()
            loss = float(loss_sum.item()) / n
    finally:
        model.train(was_training)
    correct = int(np.trace(cm_np))
    return {"accuracy": correct / n, "macro_f1": macro_f1(cm_np), "loss": loss, "num_samples": n}
