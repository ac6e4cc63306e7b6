"""The data order of training: pure functions of the seed, the epoch / step and the sample.

Every epoch visits the samples in a new order, a permutation drawn from (train.seed, epoch), `drop_last` as the
released loader (docs/algorithm.md §7.3). With `train.train_flip` each sample is h-flipped with probability
`aug.flip_prob`, decided from (train.seed, step, row), consistently in every cached array. Because the data of a step
is a function of (config, step) only, a resumed run sees exactly the batches of an uninterrupted one, and a
distributed run can give each rank its slice of the same global batch.
"""
from __future__ import annotations

import numpy as np

from weclip.pipeline.errors import TrainError

# Domains of the seeded generators, so that the order and flip streams never coincide.
_ORDER_STREAM, _FLIP_STREAM = 0, 1


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of n samples in `epoch`, from a generator seeded with (seed, epoch) only."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)


def batch_positions(step: int, n: int, batch_size: int, seed: int) -> tuple[int, np.ndarray]:
    """(epoch, positions of the samples of global step `step`), `drop_last` (docs/algorithm.md §7.3)."""
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise TrainError(f"{n} samples cannot fill one batch of {batch_size}; lower train.batch_size or add data")
    epoch, index = divmod(step, steps_per_epoch)
    return epoch, epoch_permutation(seed, epoch, n)[index * batch_size:(index + 1) * batch_size]


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of every global batch that process `rank` of `world_size` reads: the rank-th of world_size equal,
    contiguous parts, so that the ranks' parts in rank order are the global batch (docs/design.md §3.5)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if batch_size % world_size:
        raise TrainError(f"train.batch_size = {batch_size} cannot be split over {world_size} processes; run a "
                         f"number of processes that divides it, or set train.batch_size to a multiple of "
                         f"{world_size}")
    part = batch_size // world_size
    return slice(rank * part, (rank + 1) * part)


def flip_decision(seed: int, step: int, row: int, prob: float) -> bool:
    """Whether sample `row` is h-flipped at `step` (train.train_flip); a generator seeded with (seed, step, row)."""
    return bool(np.random.default_rng([seed, _FLIP_STREAM, step, row]).random() < prob)


def hflip_sample(sample: dict[str, np.ndarray], grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Mirror one cached sample left-right, consistently in every array (docs/design.md §3.2 layouts).

    Patch n = r·w + c becomes r·w + (w−1−c): `features` (L×N×D) permute the token axis, `attn` (L×N×N) both
    token axes; `cams` (K×h×w), `image` (3×H×W), `valid` (H×W) and the optional `gt_mask` (H×W) reverse their last
    axis.
    """
    h, w = grid
    perm = (np.arange(h)[:, None] * w + np.arange(w)[::-1][None, :]).reshape(-1)
    flipped = {"features": sample["features"][:, perm],
               "attn": sample["attn"][:, perm][:, :, perm],
               **{name: sample[name][..., ::-1] for name in ("cams", "image", "valid", "gt_mask") if name in sample}}
    return {**sample, **flipped}
