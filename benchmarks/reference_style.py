"""A cost model of one step of the reference GVSL training loop, for the baseline of pretrain_step.py.

Written for this benchmark (not copied): it does the same work per step as the reference code
does, on the same network, so both can be timed in one run on one machine:
* appearance transforms in numpy on one sample at a time (5000-block pixel shuffling in a Python
  loop, a Bézier curve through ``np.interp``, in-painting boxes in a loop);
* spatial augmentation per sample with two resamplings (affine grid, then the elastic field);
* the backbone run separately on each image, batch 1, samples in a Python loop;
* affine warp and deformable warp as two separate ``grid_sample`` calls;
* local NCC with a dense 9x9x9 ``conv3d`` box filter.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import comb

from gvsl import augment, spatial
from gvsl.losses import smoothness


def shuffle_blocks(x: np.ndarray, rng: np.random.Generator, blocks: int = 5000) -> np.ndarray:
    out = x.copy()
    size = x.shape
    b = [max(1, s // 20) for s in size]
    starts = [rng.integers(0, s - bb, blocks) for s, bb in zip(size, b)]
    for i in range(blocks):
        sl = tuple(slice(st[i], st[i] + bb) for st, bb in zip(starts, b))
        block = x[sl].reshape(-1)
        out[sl] = rng.permutation(block).reshape(b)
    return out


def bezier(x: np.ndarray, rng: np.random.Generator, n: int = 100_000) -> np.ndarray:
    pts = np.array([[0, 0], rng.random(2), rng.random(2), [1, 1]])
    t = np.linspace(0, 1, n)
    poly = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
    xs, ys = np.sort(pts[:, 0] @ poly), np.sort(pts[:, 1] @ poly)
    return np.interp(x, xs, ys)


def inpaint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = x.shape
    for _ in range(30):
        if rng.random() >= 0.95:
            break
        b = [int(rng.integers(s // 10, s // 5)) for s in size]
        st = [int(rng.integers(3, max(4, s - bb - 3))) for s, bb in zip(size, b)]
        x[tuple(slice(a, a + bb) for a, bb in zip(st, b))] = rng.random(b)
    return x


def appearance_numpy(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.8:
        vol = shuffle_blocks(vol, rng)
    if rng.random() < 0.9:
        vol = bezier(vol, rng)
    return inpaint(vol, rng).astype(np.float32)


def dense_ncc(a: torch.Tensor, b: torch.Tensor, win: int = 9) -> torch.Tensor:
    k = torch.ones(1, 1, win, win, win, device=a.device, dtype=a.dtype)
    p = win // 2
    s = [F.conv3d(t, k, padding=p) for t in (a, b, a * a, b * b, a * b)]
    n = win ** 3
    ua, ub = s[0] / n, s[1] / n
    cross = s[4] - ub * s[0] - ua * s[1] + ua * ub * n
    va = s[2] - 2 * ua * s[0] + ua * ua * n
    vb = s[3] - 2 * ub * s[1] + ub * ub * n
    return 1 - (cross * cross / (va * vb + 1e-5)).mean()


def step(model, optimizer, fixed: torch.Tensor, moving: torch.Tensor, rng: np.random.Generator,
         gen: torch.Generator) -> float:
    """One reference-style step on a batch, sample by sample (the reference runs batch 1 only)."""
    cfg = augment.AugmentConfig()
    total = 0.0
    for i in range(fixed.shape[0]):
        a = fixed[i:i + 1]
        b = moving[i:i + 1]
        damaged = torch.from_numpy(appearance_numpy(a[0, 0].cpu().numpy(), rng))[None, None].to(a.device)
        shape = tuple(a.shape[2:])
        mat = augment.random_affine(gen, 1, shape, cfg)
        flow = augment.random_elastic(gen, 1, shape, cfg)
        views = [spatial.warp(spatial.warp(v, mat), None, flow) for v in (a, damaged, b)]
        a, damaged, b = views
        g_a, l_a = model.unet(damaged)
        g_b, l_b = model.unet(b)
        affine = model.predict_affine(g_b, g_a, shape)
        disp = model.predict_displacement(spatial.warp(l_b, affine), l_a)
        warped = spatial.warp(spatial.warp(b, affine), None, disp)
        loss = dense_ncc(warped, a) + smoothness(disp) + F.mse_loss(model.restore(l_a), a)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total += loss.item()
    return total
