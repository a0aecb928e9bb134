"""Linear probes: embed a data set once with a frozen encoder, then fit a logistic-regression head on the cache.

The encoder runs once per sample (``extract_features``); the head is then fitted on the cached
features in a fraction of a second per pass, so many passes and a search over the weight decay
cost almost nothing. ``fit_linear_probe`` minimises the mean cross-entropy plus
``weight_decay / 2 * ||W||^2`` on standardised features (each dimension shifted to mean 0 and
scaled to variance 1 on the training set, so one decay suits every encoder), either by L-BFGS on
the whole set (``method="lbfgs"``: exact and deterministic, the default) or by mini-batch Adam
(``method="adam"``, for caches too large to take whole). With a validation split the decay is the
one that scores best on it, and the head is then refitted on training plus validation data. The
standardisation is folded into the returned ``nn.Linear``, which takes raw features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .embedding import embed_dataset
from .zero_shot import check_labels, default_label_fn

__all__ = [
    "DEFAULT_WEIGHT_DECAY",
    "DEFAULT_WEIGHT_DECAYS",
    "LinearProbe",
    "extract_features",
    "fit_linear_probe",
    "split_validation",
]

DEFAULT_WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_WEIGHT_DECAY = 1e-4
_METHODS = ("lbfgs", "adam")
_SMALL_FIT = 1 << 22  # feature elements up to which a fit runs on one thread


def extract_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    dataloader: Iterable[Any],
    label_fn: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every labelled sample once: ``(features (N, D) float32, labels (N,))``, both on the CPU.

    Args:
        encoder: maps a batch of inputs (a tensor, or the dict ``label_fn`` gives) to ``(B, D)``, e.g.
            ``model.towers["image"]`` or ``lambda x: model.encode_image(x, normalize=True)``; an
            ``nn.Module`` is run in eval mode and its training flags restored afterwards.
        dataloader: any iterable of batches.
        label_fn: ``batch -> (inputs, labels)``; default: batches are ``(inputs, labels)`` pairs.
            ``polymodal.tasks.BatchLabels(classes, "shape", "image")`` reads the built-in data.
        device: where to run the encoder; default the encoder's device.
        progress: show a progress bar.
        desc: the progress bar's label.
    """
    label_fn = label_fn or default_label_fn
    data = embed_dataset(
        encoder,
        dataloader,
        encode=encoder,
        batch_fn=lambda batch: (*label_fn(batch), None),
        device=device,
        progress=progress,
        desc=desc,
    )
    if len(data) == 0:
        raise ValueError("extract_features got no labelled samples from the dataloader")
    if not torch.isfinite(data.features).all():
        raise ValueError("the encoder produced NaN or infinite features")
    return data.features, data.labels.long()


def split_validation(
    features: torch.Tensor,
    labels: torch.Tensor,
    fraction: float = 0.2,
    seed: int = 0,
    groups: Sequence[Any] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``(train_x, train_y, val_x, val_y)`` split holding out about ``fraction`` of the rows.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)``.
        fraction: share of rows for validation.
        seed: the split's seed.
        groups: one hashable group id per row (e.g. ``(shape, colour)``); whole groups go to one side,
            so the validation score measures generalisation to groups never trained on. Groups are
            held out in random order until about ``fraction`` of the rows are.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = features.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} feature rows")
    g = torch.Generator().manual_seed(seed)
    if groups is None:
        n_val = int(round(n * fraction))
        if n_val < 1 or n_val >= n:
            raise ValueError(f"cannot hold out {fraction:.0%} of {n} samples and keep some on both sides")
        order = torch.randperm(n, generator=g)
        val, train = order[:n_val], order[n_val:]
    else:
        groups = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
        if len(groups) != n:
            raise ValueError(f"{len(groups)} group ids for {n} feature rows")
        members: dict[Any, list[int]] = {}
        for i, key in enumerate(groups):
            members.setdefault(key, []).append(i)
        if len(members) < 2:
            raise ValueError(f"a grouped split needs at least 2 groups, got {len(members)}")
        keys = list(members)
        held: list[int] = []
        for k in torch.randperm(len(keys), generator=g).tolist()[:-1]:  # at least one group stays in training
            if len(held) >= fraction * n:
                break
            held += members[keys[k]]
        is_val = torch.zeros(n, dtype=torch.bool)
        is_val[held] = True
        val, train = is_val.nonzero().flatten(), (~is_val).nonzero().flatten()
    return features[train], labels[train], features[val], labels[val]


@dataclass
class LinearProbe:
    """A fitted probe.

    Attributes:
        head: ``nn.Linear(D, C)`` on raw (unstandardised) features.
        weight_decay: the L2 strength used for the final fit.
        val_accuracy: validation top-1 accuracy per weight decay tried (empty without a search).
        train_accuracy: top-1 accuracy of the final head on the data it was fitted on.
        num_train: samples of the final fit.
        method: ``"lbfgs"`` or ``"adam"``.
    """

    head: nn.Linear
    weight_decay: float
    val_accuracy: dict[float, float] = field(default_factory=dict)
    train_accuracy: float = 0.0
    num_train: int = 0
    method: str = "lbfgs"

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, C)`` of cached features ``(N, D)``."""
        return self.head(features.to(self.head.weight.device).float())

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Top-1 class index ``(N,)``."""
        return self.logits(features).argmax(dim=-1)


def _check_features(
    features: Any, labels: Any, num_classes: int | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] == 0:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a non-empty (N, D) tensor, got {shape}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    labels = check_labels(labels, features.shape[0], num_classes or 2**62, f"{name} labels")
    return features.float().cpu(), labels.cpu()


def _loss(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, wd: float, anchor: torch.Tensor | None
) -> torch.Tensor:
    penalty = (weight if anchor is None else weight - anchor).square().sum()
    return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * wd * penalty


@contextlib.contextmanager
def _single_thread_if_small(x: torch.Tensor) -> Iterator[None]:
    """Run a small fit on one thread: its matrices are too small to split, and on a busy machine each
    extra thread mostly waits for a core (13x slower with 2 threads on 2 loaded cores, measured)."""
    threads = torch.get_num_threads()
    small = x.numel() <= _SMALL_FIT and threads > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


def _fit(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with _single_thread_if_small(args[0]):
        return _fit_weights(*args, **kwargs)


def _fit_weights(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    wd: float,
    method: str,
    max_iter: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(C, D)`` and bias ``(C,)`` minimising the penalised loss on standardised ``x``.

    The weights are pulled toward ``prior`` (weights, bias) or toward zero; the fit starts from ``start``
    (a neighbouring solution), else the prior, else zeros.
    """
    anchor = prior[0] if prior is not None else None
    start = start if start is not None else prior
    weight = (start[0].clone() if start is not None else torch.zeros(num_classes, x.shape[1])).requires_grad_(True)
    bias = (start[1].clone() if start is not None else torch.zeros(num_classes)).requires_grad_(True)
    if method == "lbfgs":
        opt = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _loss(x, y, weight, bias, wd, anchor)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt = torch.optim.Adam([weight, bias], lr=lr)
        g = torch.Generator().manual_seed(seed)
        steps_per_epoch = -(-x.shape[0] // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        for _ in range(epochs):
            for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
                opt.zero_grad()
                _loss(x[rows], y[rows], weight, bias, wd, anchor).backward()
                opt.step()
                sched.step()
    return weight.detach(), bias.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return ((x @ weight.T + bias).argmax(dim=-1) == y).float().mean().item()


def _check_prior(
    prior: nn.Linear | tuple[torch.Tensor, torch.Tensor] | None, num_classes: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if prior is None:
        return None
    if isinstance(prior, nn.Linear):
        bias = prior.bias if prior.bias is not None else torch.zeros(prior.out_features)
        prior = (prior.weight, bias)
    weight, bias = (torch.as_tensor(t).detach().float().cpu() for t in prior)
    if weight.shape != (num_classes, dim) or bias.shape != (num_classes,):
        raise ValueError(
            f"prior must be weights ({num_classes}, {dim}) and bias ({num_classes},) for these features, got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError("prior has NaN or infinite values")
    return weight, bias


def _standardised_prior(
    prior: tuple[torch.Tensor, torch.Tensor] | None, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same head on standardised features: W f + b = (W std) ((f - mean) / std) + (b + W mean)."""
    if prior is None:
        return None
    weight, bias = prior
    return weight * std, bias + weight @ mean


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    weight_decay: float | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    method: str = "lbfgs",
    max_iter: int = 300,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 1024,
    refit: bool = True,
    prior: nn.Linear | tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LinearProbe:
    """Fit a logistic-regression head on cached features (see the module docstring).

    Args:
        features: ``(N, D)`` training features.
        labels: ``(N,)`` class indices.
        num_classes: C; default ``labels.max() + 1``.
        val_features, val_labels: a validation split to choose the weight decay on.
        weight_decay: use this L2 strength and search nothing; default: the best of
            ``weight_decays`` on the validation split, or ``DEFAULT_WEIGHT_DECAY`` without one.
        weight_decays: the strengths tried when searching.
        method: ``"lbfgs"`` (whole-set L-BFGS) or ``"adam"`` (mini-batch Adam with a cosine schedule).
        max_iter: L-BFGS iterations.
        epochs: Adam passes over the features.
        lr: Adam learning rate.
        batch_size: Adam mini-batch size.
        refit: after the search, refit on training plus validation data with the chosen decay.
        prior: a head on the same raw features (an ``nn.Linear`` or ``(weight (C, D), bias (C,))``),
            e.g. a zero-shot classifier expressed on these features: the fit starts from it and the
            decay pulls the weights toward it instead of toward zero, so a strong decay gives back
            the prior and a weak one a free probe.
        seed: Adam's shuffling seed.
        progress: show a progress bar over the search.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if (val_features is None) != (val_labels is None):
        raise ValueError("give both val_features and val_labels, or neither")
    features, labels = _check_features(features, labels, num_classes, "features")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if val_features is not None:
        val_features, val_labels = _check_features(val_features, val_labels, num_classes, "val_features")
        if val_features.shape[1] != features.shape[1]:
            raise ValueError(
                f"val_features have {val_features.shape[1]} dimensions, the training features {features.shape[1]}"
            )
    if weight_decay is not None and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    search = weight_decay is None and val_features is not None
    if search and (not weight_decays or any(w < 0 for w in weight_decays)):
        raise ValueError(f"weight_decays must be non-negative values, got {weight_decays!r}")
    options = dict(method=method, max_iter=max_iter, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    prior = _check_prior(prior, num_classes, features.shape[1])

    def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False).clamp_min(1e-6 * x.std().clamp_min(1e-12))
        return mean, std

    val_accuracy: dict[float, float] = {}
    if search:
        mean, std = standardise(features)
        x, xv = (features - mean) / std, (val_features - mean) / std
        # Strongest decay first, each fit starting from the previous solution: neighbouring decays have
        # neighbouring optima, so L-BFGS needs far fewer iterations than from zeros.
        w_b = None
        for wd in tqdm(sorted(set(map(float, weight_decays)), reverse=True), disable=not progress, desc="weight decay"):
            w_b = _fit(x, labels, num_classes, wd, prior=_standardised_prior(prior, mean, std), start=w_b, **options)
            w, b = w_b
            val_accuracy[wd] = _accuracy(xv, val_labels, w, b)
        # The strongest decay among the best: simpler heads generalise at least as well.
        best = max(val_accuracy.values())
        weight_decay = max(wd for wd, acc in val_accuracy.items() if acc == best)
        if refit:
            features, labels = torch.cat([features, val_features]), torch.cat([labels, val_labels])
    elif weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAY
    mean, std = standardise(features)
    x = (features - mean) / std
    w, b = _fit(x, labels, num_classes, float(weight_decay), prior=_standardised_prior(prior, mean, std), **options)
    train_accuracy = _accuracy(x, labels, w, b)
    # Fold the standardisation in: W ((f - mean) / std) + b = (W / std) f + (b - W mean / std).
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(w / std)
        head.bias.copy_(b - (w / std) @ mean)
    return LinearProbe(
        head=head,
        weight_decay=float(weight_decay),
        val_accuracy=val_accuracy,
        train_accuracy=train_accuracy,
        num_train=features.shape[0],
        method=method,
    )
