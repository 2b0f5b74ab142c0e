"""Pixel-integrated elliptical Sersic stamps: the profiles of every model cube.

A stamp holds, in each pixel, the integral over that pixel of

    I(R) = I_e exp(-b_n ((R / r_e)^(1/n) - 1)),   R^2 = x'^2 + (y' / q)^2,

where x' runs along the major axis at ``angle`` degrees counter-clockwise from +x (array axis 1)
towards +y (array axis 0), the profile is centred on the centre of pixel
``[boxsize // 2, boxsize // 2]``, and I_e is set so that the untruncated profile has unit total flux
(a stamp sums to less than 1 when light falls outside it).

How the integrals are done:

* the central pixel holds the cusp; it is integrated exactly along rays from the centre, using the
  analytic flux inside an ellipse (a regularised incomplete gamma function), with Gauss-Legendre
  in the ray angle;
* every other pixel is integrated by vectorised adaptive cubature with Gauss-Legendre 2x2 and 3x3
  rules: a square is accepted when the rules agree within its error budget and it is small compared
  with q times its distance to the centre (thin profiles hide narrow ridges), or when rigorous
  bounds (the profile falls monotonically with R) already pin its integral down; otherwise it is
  split into four;
* the profile is point-symmetric about the centre, so only half the stamp is integrated; and the
  stamp at angle 180 - theta is the mirror image (x -> -x) of the stamp at theta, so angles are
  taken to [0, 90] and a grid's theta, 180 - theta pairs cost one integration.

Many stamps are rendered in work units, by worker processes if asked (`render_units`, ``workers``);
a stamp does not depend on the work unit or process that renders it.

The error budget per pixel is ``RTOL`` times its value plus ``ATOL`` per unit area (unit total flux).
Checked against an exact ray-integral reference (see tests/test_sersic.py) for n = 0.3..10,
q = 0.1..1 and r_e = 0.05..300 px: relative error <= 1.2e-5 (99 % of pixels < 1e-6) wherever a
pixel holds more than 1e-6 of the flux, absolute error < 1e-7 everywhere. The default grid
(2,289 distinct stamps, 1,344 integrations) renders in about 2 s on one core; the ``sersic`` preset
grid (27,468 distinct stamps) in about 24 s on one core, 14 s with two worker processes
(benchmarks/bench_models.py).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy.special import gammainc, gammaincinv, gammaln

#: Bump when the rendered values change; model-cube caches carry it in their name.
RENDERER_VERSION = "2"
RTOL = 1e-5
ATOL = 1e-10
MAX_DEPTH = 14
RULE_SAFETY = 2.0  # accept GL3 when |GL2 - GL3| <= RULE_SAFETY * budget (GL3 is far better than GL2)
GEO_RESOLUTION = 1.0  # squares split until side <= GEO_RESOLUTION * q * (distance to centre)
SQUARES_PER_BATCH = 1 << 16
UNIT_HALF_PIXELS = 1 << 19  # pixels per work unit of `render_units` (56 stamps of 128x128)
MAX_DEFAULT_WORKERS = 8
TENSOR_CHUNK = 1 << 17  # nodes per temporary array in the first (whole-pixel) pass
ANGLE_NODES = 32
#: Profile exponents are clamped here before exp(): e^-700 < 1e-304 is nothing next to ATOL, and
#: NumPy's exp is 3-20x slower on arguments whose result underflows (compact models' far pixels).
EXP_FLOOR = -700.0

_G2 = np.array([-1.0, 1.0]) / np.sqrt(3.0)
_G3 = np.array([-np.sqrt(0.6), 0.0, np.sqrt(0.6)])
_W2 = np.ones(2)
_W3 = np.array([5.0, 8.0, 5.0]) / 9.0
# 13 nodes on [-1, 1]^2: the 2x2 rule (weights 1) then the 3x3 rule
_NODE_U = np.concatenate([np.repeat(_G2, 2), np.repeat(_G3, 3)])
_NODE_V = np.concatenate([np.tile(_G2, 2), np.tile(_G3, 3)])
_WEIGHT_3 = np.outer(_W3, _W3).ravel()
_ANGLE_RULE = np.polynomial.legendre.leggauss(ANGLE_NODES)


def sersic_bn(n):
    """The Sersic b_n for which r_e is the half-light radius: ``gammaincinv(2n, 0.5)``."""
    return gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)


def enclosed_fraction(n, r_e, radius):
    """Fraction of the total flux inside elliptical radius ``radius`` (major-axis units, pixels)."""
    n = np.asarray(n, dtype=np.float64)
    x = sersic_bn(n) * (np.asarray(radius, dtype=np.float64) / r_e) ** (1.0 / n)
    return gammainc(2.0 * n, x)


def log_central_intensity(n, ax_ratio, r_e):
    """ln I(0) = ln(I_e e^b_n) of the unit-flux profile (flux per pixel area)."""
    n = np.asarray(n, dtype=np.float64)
    b = sersic_bn(n)
    return 2.0 * n * np.log(b) - np.log(2.0 * np.pi * n * ax_ratio * r_e ** 2) - gammaln(2.0 * n)


def render_sersic(n, ax_ratio, angle_deg, r_e, boxsize=128, dtype=np.float32):
    """One pixel-integrated, unit-total-flux Sersic stamp.

    Parameters
    ----------
    n : float
        Sersic index.
    ax_ratio : float
        Axis ratio b/a, in (0, 1].
    angle_deg : float
        Position angle of the major axis, degrees counter-clockwise from +x (axis 1) towards +y.
    r_e : float
        Half-light radius along the major axis, pixels.
    boxsize : int
        Stamp side; the profile is centred on the centre of pixel ``[boxsize // 2, boxsize // 2]``.
    dtype : numpy dtype
        Output type (the integration is done in float64).

    Returns
    -------
    ndarray, shape (boxsize, boxsize)
    """
    return render_models([n], [ax_ratio], [angle_deg], [r_e], boxsize, dtype)[0]


def render_models(n, ax_ratio, angle_deg, r_e, boxsize=128, dtype=np.float32, workers=1):
    """Stamps for equal-length (or scalar, broadcast) parameter arrays.

    Parameters
    ----------
    n, ax_ratio, angle_deg, r_e : array_like
        Sersic index, b/a, position angle (degrees) and major-axis half-light radius (pixels).
    boxsize : int
        Stamp side.
    dtype : numpy dtype
        Output type (the integration is done in float64).
    workers : int or None
        Processes rendering at once (None: `default_workers`); the stamps are the same, bit for
        bit, whatever the number.

    Returns
    -------
    ndarray, shape (K, boxsize, boxsize)
    """
    out = None

    def store(where, stamps):
        out[where] = stamps

    n, q, angle, r_e = _parameter_arrays(n, ax_ratio, angle_deg, r_e, boxsize)
    out = np.empty((n.size, boxsize, boxsize), dtype=dtype)
    render_units(n, q, angle, r_e, boxsize, store, dtype, workers)
    return out


def render_units(n, ax_ratio, angle_deg, r_e, boxsize, store, dtype=np.float32, workers=1):
    """Render models in work units and hand each unit's stamps to ``store(indices, stamps)``.

    Each model is rendered from its *canonical* parameters: the angle taken modulo 180 degrees and,
    above 90, mirrored to 180 - angle (the stamp is then mirrored left-right, exactly), so a grid's
    angles theta and 180 - theta cost one integration. The distinct canonical models of each
    Sersic index are cut into units of about `UNIT_HALF_PIXELS` pixels, whatever the number of
    workers, and a model's stamp does not depend on the other models rendered with it: the output
    is the same, bit for bit, for any number of workers. ``store`` is called in unit order, in this
    process, with the positions of the unit's models in the (broadcast) parameter arrays and their
    ``(m, boxsize, boxsize)`` stamps of type ``dtype``. With more than one worker the units are
    rendered by a pool of ``spawn``-ed processes (one BLAS thread each): a script that renders
    with several workers needs the ``if __name__ == "__main__":`` guard.

    Parameters
    ----------
    n, ax_ratio, angle_deg, r_e : array_like
        As for `render_models`.
    boxsize : int
        Stamp side.
    store : callable
        ``store(indices, stamps)``, called once per unit.
    dtype : numpy dtype
        Stamp type.
    workers : int or None
        Processes (None: `default_workers`); never more than there are units.
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    units, jobs = _work_units(*_parameter_arrays(n, ax_ratio, angle_deg, r_e, boxsize), boxsize,
                              np.dtype(dtype).str)
    workers = min(workers, len(units))
    if multiprocessing.current_process().daemon:  # a daemonic process may not have children
        workers = 1
    if workers <= 1:
        for unit, job in zip(units, jobs):
            store(unit, _render_unit(job))
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker)
    try:
        futures = [pool.submit(_render_unit, job) for job in jobs]
        for k, unit in enumerate(units):
            stamps = futures[k].result()
            futures[k] = None  # the stamps are stored: let them go
            store(unit, stamps)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Processes for rendering when none are asked for: the CPUs this process may use, at most
    `MAX_DEFAULT_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def _parameter_arrays(n, ax_ratio, angle_deg, r_e, boxsize):
    arrays = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64).ravel()
                                   for v in (n, ax_ratio, angle_deg, r_e)))
    _check_parameters(*arrays, boxsize)
    return arrays


def _work_units(n, q, angle, r_e, boxsize, dtype):
    """The work units: for each, the positions of its models and the job `_render_unit` takes.

    A job renders distinct canonical models (one index n; angle in [0, 90]) and returns the stamps of
    the unit's models, each its canonical model's, mirrored left-right where ``flip``.
    """
    angle = np.mod(angle, 180.0)
    flip = angle > 90.0
    angle = np.where(flip, 180.0 - angle, angle)  # exact: Sterbenz
    per_unit = max(1, UNIT_HALF_PIXELS // _half_pixels(boxsize))
    units, jobs = [], []
    for value in np.unique(n):
        where = np.flatnonzero(n == value)
        keys = np.stack([q[where], angle[where], r_e[where]], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)  # canonical models in order of first use
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        canonical, inverse = where[first[order]], rank[inverse.ravel()]
        for lo in range(0, canonical.size, per_unit):
            models = canonical[lo:lo + per_unit]
            mine = (inverse >= lo) & (inverse < lo + per_unit)
            units.append(where[mine])
            jobs.append((float(value), q[models], angle[models], r_e[models], boxsize, dtype,
                         inverse[mine] - lo, flip[where[mine]]))
    return units, jobs


def _half_pixels(boxsize):
    return (boxsize // 2 + 1) * (2 * (boxsize // 2) + 1)


def _render_unit(job):
    """Stamps of one work unit (see `_work_units`), in batches that keep temporaries small."""
    n, q, angle, r_e, boxsize, dtype, which, flip = job
    out = np.empty((which.size, boxsize, boxsize), dtype=np.dtype(dtype))
    per_batch = max(1, SQUARES_PER_BATCH // _half_pixels(boxsize))
    for lo in range(0, q.size, per_batch):
        half = _half_planes(n, q[lo:lo + per_batch], angle[lo:lo + per_batch],
                            r_e[lo:lo + per_batch], boxsize)
        mine = np.flatnonzero((which >= lo) & (which < lo + per_batch))
        half = half[which[mine] - lo]
        half[flip[mine]] = half[flip[mine], :, ::-1]  # I(x, y; 180 - angle) = I(-x, y; angle)
        out[mine] = _mirror(half, boxsize)
    return out


def _init_worker():
    """A rendering process: one BLAS thread (the processes are the parallelism); Ctrl-C is the
    parent's to handle (it cancels the units not started)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of dre_hpc
        return
    threadpool_limits(1)


def render_grid(grid, flat_indices=None, workers=1):
    """Render cells of a `ModelGrid`.

    Parameters
    ----------
    grid : ModelGrid
    flat_indices : array_like of int, optional
        Flat full-grid indices (default: every cell), e.g. ``grid.unique_models()[0]``.
    workers : int or None
        Processes rendering at once (None: `default_workers`); the result does not depend on it.

    Returns
    -------
    ndarray of float32, shape (K, boxsize, boxsize)
    """
    if flat_indices is None:
        flat_indices = np.arange(grid.size)
    flat_indices = np.asarray(flat_indices, dtype=np.int64).ravel()
    if flat_indices.size and (flat_indices.min() < 0 or flat_indices.max() >= grid.size):
        raise IndexError(f"flat grid indices must lie in [0, {grid.size})")
    par = grid.parameters(flat_indices)
    return render_models(par["INDEX"], par["AX_RATIO"], par["ANGLE"], 10.0 ** par["LOGR"],
                         grid.boxsize, workers=workers)


def _check_parameters(n, q, angle, r_e, boxsize):
    if not (np.all(np.isfinite(n)) and np.all(n > 0)):
        raise ValueError("Sersic index n must be finite and > 0")
    if not np.all((q > 0) & (q <= 1)):
        raise ValueError("axis ratio must lie in (0, 1]")
    if not (np.all(np.isfinite(r_e)) and np.all(r_e > 0)):
        raise ValueError("half-light radius r_e must be finite and > 0")
    if not np.all(np.isfinite(angle)):
        raise ValueError("position angle must be finite")
    if int(boxsize) != boxsize or boxsize < 1:
        raise ValueError(f"boxsize must be a positive integer, got {boxsize}")


class _Profiles:
    """Per-stamp constants: R^2/r_e^2 = a11 x^2 + a12 x y + a22 y^2, ln I(0), b_n, q; one index n."""

    def __init__(self, n, q, angle_deg, r_e):
        theta = np.deg2rad(angle_deg)
        c, s = np.cos(theta), np.sin(theta)
        inv_q2, inv_r2 = 1.0 / q ** 2, 1.0 / r_e ** 2
        self.a11 = (c * c + s * s * inv_q2) * inv_r2
        self.a12 = 2.0 * c * s * (1.0 - inv_q2) * inv_r2
        self.a22 = (s * s + c * c * inv_q2) * inv_r2
        self.n, self.q, self.theta, self.r_e = float(n), q, theta, r_e
        self.b = float(sersic_bn(n))
        self.log_i0 = log_central_intensity(n, q, r_e)

    def take(self, sid):
        """Coefficient columns gathered per square: a11, a12, a22, ln I0 as ``(S, 1)`` arrays."""
        return tuple(v[sid][:, None] for v in (self.a11, self.a12, self.a22, self.log_i0))


def _power(x, p):
    """x ** p for x >= 0, with exact square-root chains for p = 1, 1/2, 1/4, 1/8, 1/16."""
    for k in range(5):
        if p == 0.5 ** k:
            for _ in range(k):
                x = np.sqrt(x)
            return x
    with np.errstate(divide="ignore"):
        return np.exp(p * np.log(x))


def _exp_floored(arg):
    """exp(max(arg, EXP_FLOOR)), in place on the temporary ``arg``."""
    np.maximum(arg, EXP_FLOOR, out=arg)
    return np.exp(arg, out=arg)


def _half_planes(n, q, angle_deg, r_e, boxsize):
    """Pixel integrals over rows dy in [-c, 0] and columns dx in [-c, c], one index n: (k, c+1, 2c+1)."""
    prof = _Profiles(n, q, angle_deg, r_e)
    half = _integrate_half_plane(prof, boxsize)
    c = boxsize // 2
    half[:, c, c] = _central_pixel(prof)
    return half


def _central_pixel(prof):
    """Integral over the central pixel, cusp included, as an integral over ray directions.

    Along direction psi the elliptical radius is r * sqrt(Qe(psi)) and the pixel edge is at
    r = R(psi), so the pixel integral is int dpsi F(R sqrt(Qe)) / (2 pi q Qe), F the analytic flux
    fraction inside an ellipse; Gauss-Legendre in psi between the kinks (corners, axes), over
    [0, pi] and doubled by symmetry.
    """
    nodes, weights = _ANGLE_RULE
    theta = np.mod(prof.theta, np.pi)
    breaks = np.sort(np.stack([np.zeros_like(theta), np.full_like(theta, np.pi / 4),
                               np.full_like(theta, 3 * np.pi / 4), np.full_like(theta, np.pi),
                               theta, np.mod(theta + np.pi / 2, np.pi)], axis=1), axis=1)
    lo, hi = breaks[:, :-1, None], breaks[:, 1:, None]
    psi = 0.5 * (lo + hi) + 0.5 * (hi - lo) * nodes
    w = 0.5 * (hi - lo) * weights
    rel = psi - prof.theta[:, None, None]
    q = prof.q[:, None, None]
    qe = np.cos(rel) ** 2 + (np.sin(rel) / q) ** 2
    radius = 0.5 / np.maximum(np.abs(np.cos(psi)), np.abs(np.sin(psi)))
    frac = enclosed_fraction(prof.n, prof.r_e[:, None, None], radius * np.sqrt(qe))
    return 2.0 * np.sum(w * frac / (2.0 * np.pi * q * qe), axis=(1, 2))


def _integrate_half_plane(prof, boxsize):
    """Adaptive cubature over rows dy in [-c, 0] and columns dx in [-c, c] (centre pixel left 0).

    Level 0 (whole pixels) works on the ``(k, c + 1, 2c + 1)`` arrays of the tensor-grid rules; only
    the pixels it does not accept become a list of squares for the refinement levels.
    """
    c = boxsize // 2
    k, n_half = prof.q.size, (c + 1) * (2 * c + 1)
    g2, g3 = (_pixel_rule(prof, c, nodes, weights).reshape(k, n_half)
              for nodes, weights in ((_G2, _W2), (_G3, _W3)))
    density = RTOL * g3 + ATOL  # pixel-level error budget per unit area (= the budget of a pixel)
    dx, dy, dist = _pixel_geometry(c)
    if MAX_DEPTH == 0:
        done = np.ones(g3.shape, dtype=bool)
    else:
        done = np.abs(g2 - g3) <= RULE_SAFETY * density
        done &= 1.0 <= GEO_RESOLUTION * prof.q[:, None] * dist
    done[:, c * (2 * c + 1) + c] = True  # the centre pixel is integrated separately
    rest = np.flatnonzero(~done)
    sid, pixel = np.divmod(rest, n_half)
    if rest.size:
        lo, hi = _bounds(prof, sid, dx[pixel], dy[pixel], 0.5)
        done.ravel()[rest] = hi - lo <= density.ravel()[rest]
    out = np.where(done, g3, 0.0).ravel()
    out[c * (2 * c + 1) + c::n_half] = 0.0
    todo = rest[~done.ravel()[rest]]
    sid, pixel = np.divmod(todo, n_half)
    sid, pix, cx, cy, density = _split(np.arange(todo.size), sid, todo, dx[pixel], dy[pixel],
                                       density.ravel()[todo], 0.5)
    h = 0.25
    for level in range(1, MAX_DEPTH + 1):
        if sid.size == 0:
            break
        g2, g3 = _rules(prof, sid, cx, cy, h)
        done = _converged(prof, sid, cx, cy, h, g2, g3, density * 4 * h * h, level)
        out += np.bincount(pix[done], weights=g3[done], minlength=out.size)
        todo = np.flatnonzero(~done)
        if todo.size == 0:
            break
        sid, pix, cx, cy, density = _split(todo, sid, pix, cx, cy, density, h)
        h *= 0.5
    return out.reshape(k, c + 1, 2 * c + 1)


@functools.lru_cache(maxsize=8)
def _pixel_geometry(c):
    """Centres (dx, dy) of the half-plane pixels, flat, and each pixel's distance to the centre."""
    dy, dx = np.mgrid[-c:1, -c:c + 1]
    dy, dx = dy.ravel().astype(np.float64), dx.ravel().astype(np.float64)
    dist = np.hypot(np.maximum(np.abs(dx) - 0.5, 0.0), np.maximum(np.abs(dy) - 0.5, 0.0))
    for a in (dx, dy, dist):
        a.flags.writeable = False
    return dx, dy, dist


def _pixel_rule(prof, c, nodes, weights):
    """A product Gauss-Legendre rule on every half-plane pixel, evaluated on one tensor grid.

    All stamps share the node coordinates, so R^2 = a11 x^2 + a12 x y + a22 y^2 costs three
    broadcast operations per node; chunks of stamps keep the temporaries cache-sized.
    """
    m = nodes.size
    x = (np.arange(-c, c + 1.0)[:, None] + 0.5 * nodes).ravel()
    y = (np.arange(-c, 1.0)[:, None] + 0.5 * nodes).ravel()
    xy, xx, yy = np.multiply.outer(y, x), x * x, (y * y)[:, None]
    k = prof.q.size
    out = np.empty((k, c + 1, 2 * c + 1))
    chunk = max(1, TENSOR_CHUNK // xy.size)
    for lo in range(0, k, chunk):
        sl = slice(lo, lo + chunk)
        a11, a12, a22, log_i0 = (v[sl, None, None] for v in
                                 (prof.a11, prof.a12, prof.a22, prof.log_i0))
        r2 = a12 * xy
        r2 += a11 * xx
        r2 += a22 * yy
        f = _power(r2, 0.5 / prof.n)
        f *= -prof.b
        f += log_i0
        np.maximum(f, EXP_FLOOR, out=f)
        np.exp(f, out=f)
        f = f.reshape(-1, c + 1, m, 2 * c + 1, m) @ weights
        out[sl] = 0.25 * (weights @ f)
    return out


def _rules(prof, sid, cx, cy, h):
    """Gauss-Legendre 2x2 and 3x3 integrals over squares of half-side h centred on (cx, cy)."""
    a11, a12, a22, log_i0 = prof.take(sid)
    x = cx[:, None] + h * _NODE_U
    y = cy[:, None] + h * _NODE_V
    r2 = (a11 * x + a12 * y) * x + a22 * y * y
    f = _exp_floored(log_i0 - prof.b * _power(r2, 0.5 / prof.n))
    area = h * h
    return area * f[:, :4].sum(axis=1), area * (f[:, 4:] @ _WEIGHT_3)


def _converged(prof, sid, cx, cy, h, g2, g3, budget, level):
    """Squares whose 3x3 value is accepted: rules agree on a resolved square, or bounds suffice."""
    if level == MAX_DEPTH:
        return np.ones(sid.size, dtype=bool)
    dist = np.hypot(np.maximum(np.abs(cx) - h, 0.0), np.maximum(np.abs(cy) - h, 0.0))
    done = (np.abs(g2 - g3) <= RULE_SAFETY * budget) & (2 * h <= GEO_RESOLUTION * prof.q[sid] * dist)
    rest = np.flatnonzero(~done)
    if rest.size:
        lo, hi = _bounds(prof, sid[rest], cx[rest], cy[rest], h)
        done[rest] = 4 * h * h * (hi - lo) <= budget[rest]
    return done


def _bounds(prof, sid, cx, cy, h):
    """Lowest and highest profile value on each square (the profile falls monotonically with R)."""
    a11, a12, a22, log_i0 = (v[:, 0] for v in prof.take(sid))
    x0, x1, y0, y1 = cx - h, cx + h, cy - h, cy + h

    def form(x, y):
        return (a11 * x + a12 * y) * x + a22 * y * y

    r2_max = np.maximum.reduce([form(x0, y0), form(x0, y1), form(x1, y0), form(x1, y1)])
    # the minimum of a positive-definite form over a box lies on an edge unless the box holds 0
    edge = [form(xe, np.clip(-a12 * xe / (2 * a22), y0, y1)) for xe in (x0, x1)]
    edge += [form(np.clip(-a12 * ye / (2 * a11), x0, x1), ye) for ye in (y0, y1)]
    r2_min = np.minimum.reduce(edge)
    r2_min[(x0 <= 0) & (x1 >= 0) & (y0 <= 0) & (y1 >= 0)] = 0.0
    p = 0.5 / prof.n
    return (_exp_floored(log_i0 - prof.b * _power(r2_max, p)),
            _exp_floored(log_i0 - prof.b * _power(r2_min, p)))


def _split(todo, sid, pix, cx, cy, density, h):
    """Replace each listed square by its four children (half-side h / 2)."""
    quarter = 0.5 * h
    off_x = np.array([-quarter, quarter, -quarter, quarter])
    off_y = np.array([-quarter, -quarter, quarter, quarter])
    new_cx = (cx[todo][:, None] + off_x).ravel()
    new_cy = (cy[todo][:, None] + off_y).ravel()
    return (np.repeat(sid[todo], 4), np.repeat(pix[todo], 4), new_cx, new_cy,
            np.repeat(density[todo], 4))


def _mirror(half, boxsize):
    """Full stamps from the half plane, using I(-x, -y) = I(x, y)."""
    c = boxsize // 2
    n_pos = boxsize - 1 - c
    out = np.empty((half.shape[0], boxsize, boxsize))
    out[:, :c + 1, :] = half[:, :, :boxsize]
    rows = c - np.arange(1, n_pos + 1)
    cols = 2 * c - np.arange(boxsize)
    out[:, c + 1:, :] = half[:, rows][:, :, cols]
    return out
