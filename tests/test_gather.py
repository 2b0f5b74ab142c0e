"""The compiled preparation of a group (dre_hpc.fit.gather) gives the array code's values to the bit.

`engine.prepare_group` and `engine.footprint_extent` run compiled on NumPy (`compiled.FUSED`) and
as array code on CuPy; both are run here on the same batches and compared byte for byte: random
cutouts with sub-pixel and larger offsets, bad pixels (NaN data, rms <= 0), masks at the stamp's
edges and corners, empty masks, radial prefixes from a few pixels to the whole stamp.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dre_hpc.fit import compiled, engine
from dre_hpc.fit.model_matrix import radial_layout

B = 64


def _mm(box=B):
    order, rank, radius = radial_layout(box)
    return SimpleNamespace(grid=SimpleNamespace(boxsize=box), order=order, rank=rank, radius=radius,
                           n_pixels=box * box)


def _batch(rng, n_obj=24, box=B):
    """A cleaned batch (`engine.clean_cutouts`' tuple) of noise-and-blob cutouts with odd cases."""
    y, x = np.mgrid[:box, :box] - box // 2
    data = rng.normal(0, 1, (n_obj, box, box)).astype(np.float32)
    data += (50 * np.exp(-(x ** 2 + y ** 2) / 20.0)).astype(np.float32)
    rms = rng.uniform(0.5, 2.0, (n_obj, box, box)).astype(np.float32)
    mask = np.zeros((n_obj, box, box), bool)
    for i in range(n_obj):
        r = rng.uniform(2, box)
        cy, cx = rng.integers(-box // 2, box // 2, 2) * (i % 3 == 0)
        mask[i] = (y - cy) ** 2 + (x - cx) ** 2 / rng.uniform(0.2, 1) < r * r
    mask[1] = False                                               # empty
    mask[2, :3, :] = True                                         # the top edge
    mask[3, -1, -1] = True                                        # one corner pixel
    offsets = rng.uniform(-1.5, 1.5, (n_obj, 2))
    offsets[4] = 0.0
    offsets[5] = (3.7, -2.5)                                      # beyond a pixel
    offsets[6] = (0.5, -0.5)                                      # rint rounds half to even
    cuts = SimpleNamespace(data=data, rms=rms, mask=mask, offsets=offsets,
                           objects={"CUT_FLAGS": np.zeros(n_obj, np.int64)})
    cuts.data[7, 28:34, 33] = np.nan                              # near the centre
    cuts.rms[8, 30:34, 30:34] = 0.0
    cuts.rms[9, 0, :] = -1.0
    return engine.clean_cutouts(cuts)


def _both(monkeypatch, fn):
    out = []
    monkeypatch.setattr(compiled, "_worth_loading", True)       # as in a large fit
    for fused in (True, False):
        monkeypatch.setattr(compiled, "FUSED", fused)
        out.append(fn())
    return out


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("n", [5, 200, 1500, B * B])
def test_prepared_group_is_the_array_codes_to_the_bit(monkeypatch, centre, n):
    rng = np.random.default_rng(n + centre)
    clean, mm = _batch(rng), _mm()
    index = np.array([0, 2, 3, 5, 6, 7, 8, 9, 11, 4, 1, 17, 23])
    fused, arrays = _both(monkeypatch, lambda: engine.prepare_group(np, mm, clean, index, n, centre, 16))
    for name in ("d", "w", "rms", "usable", "npix"):
        a, b = getattr(fused, name), getattr(arrays, name)
        assert a.dtype == b.dtype and a.shape == b.shape == ((len(index), n) if name != "npix" else (len(index),))
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert (fused.w[fused.npix < 16] == 0).all()
    if centre and n >= 200:                       # the bad pixels were in reach and are unusable
        assert not fused.usable[index == 7].all() and fused.npix[index == 1] == 0


@pytest.mark.parametrize("centre", [True, False])
def test_mask_extent_is_the_array_codes(monkeypatch, centre):
    rng = np.random.default_rng(3)
    clean, mm = _batch(rng, n_obj=40), _mm()
    fused, arrays = _both(monkeypatch, lambda: engine.footprint_extent(mm, clean[2], clean[4], centre))
    np.testing.assert_array_equal(fused, arrays)
    assert fused[1] == 0 and fused.max() == B * B             # an empty mask; a corner pixel
