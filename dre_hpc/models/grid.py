"""The parameter grid of a model cube: Sersic index, axis ratio, position angle, log10 radius.

Conventions (shared by the renderer, the cube files and the fit):

* grid shape is ``(n_index, n_axratio, n_angle, n_logr)``; each axis is ``start + step * arange(count)``;
* ``AX_RATIO`` is b/a; ``ANGLE`` is the position angle of the major axis in degrees, counter-clockwise
  from the +x axis (array axis 1) towards +y (array axis 0), period 180;
* ``LOGR`` is log10 of the half-light radius along the major axis, in pixels;
* every stamp is ``boxsize x boxsize`` with the profile centred on the centre of array pixel
  ``[boxsize // 2, boxsize // 2]`` (0-based; FITS pixel ``boxsize // 2 + 1``), unit total flux.

Models that are identical by symmetry (every angle at b/a = 1, angles that differ by 180 degrees)
share one *unique* model: the fit evaluates each unique model once and expands the result back to
the full grid with :meth:`ModelGrid.unique_models`. The unique models are ordered by how far they
reach (`support_radius`), so that models of about the same extent lie side by side in the fit's
model matrix and its products stop each block of them where they end
(`fit.model_matrix.ModelMatrix.column_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CubeFormatError

#: Header key triplets (count, start, step) of each axis, in grid order.
AXIS_KEYS = {
    "INDEX": ("NINDEX", "INDEX0", "DINDEX"),
    "AX_RATIO": ("NAXRAT", "AXRAT0", "DAXRAT"),
    "ANGLE": ("NPOSANG", "POSANG0", "DPOSANG"),
    "LOGR": ("NLOGH", "LOGH0", "DLOGH"),
}
AXIS_NAMES = tuple(AXIS_KEYS)
ROUND_TOLERANCE = 1e-6
#: The order of the unique models (`ModelGrid.unique_models`): by `support_radius`, then grid
#: order. Part of the identity of everything stored per unique model (convolved models, cores).
UNIQUE_ORDER = "support-v1"
#: Fraction of a model's sum of squares beyond its support: `support_radius` before the PSF,
#: `fit.model_matrix.model_support` after it.
SUPPORT_TAIL = 1e-7


def support_radius(index, logr, tail: float = SUPPORT_TAIL) -> np.ndarray:
    """Major-axis radius (pixels) beyond which a Sersic profile of index `index` and log10
    half-light radius `logr` holds `tail` of its sum of squares, before any PSF: I^2 is a Sersic
    profile of the same index with its scale divided by 2^n, so the radius solves
    ``Q(2n, 2 b_n (R / r_e)^(1/n)) = tail`` (Q: the regularised upper incomplete gamma function)."""
    from scipy.special import gammainccinv, gammaincinv
    n = np.maximum(np.asarray(index, float), 0.05)
    b_n = gammaincinv(2 * n, 0.5)
    return 10.0 ** np.asarray(logr, float) * (gammainccinv(2 * n, tail) / (2 * b_n)) ** n


@dataclass(frozen=True)
class Axis:
    """One regular grid axis."""

    name: str
    start: float
    step: float
    count: int

    def __post_init__(self):
        if int(self.count) < 1:
            raise CubeFormatError(f"grid axis {self.name}: count must be >= 1, got {self.count}")
        if self.count > 1 and not self.step > 0:
            raise CubeFormatError(f"grid axis {self.name}: step must be > 0, got {self.step}")

    @property
    def values(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.count, dtype=np.float64)


@dataclass(frozen=True)
class ModelGrid:
    """A regular grid of Sersic models and the stamp geometry."""

    index: Axis
    ax_ratio: Axis
    angle: Axis
    logr: Axis
    boxsize: int = 128
    has_index_axis: bool = True
    #: The dre_hpc renderer version of a cube's stamps (its ``RENDERV`` card), "" when unknown:
    #: only then do the stamps' parameters say exactly what they hold (`models.core`).
    renderer: str = field(default="", compare=False)
    #: The cube file the grid was read from ("" for a grid made in memory).
    source: str = field(default="", compare=False)
    _unique: tuple = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def default(cls) -> "ModelGrid":
        """The original DRE grid without its duplicate 180-degree column (n = 4 only)."""
        return cls(
            index=Axis("INDEX", 4.0, 0.0, 1),
            ax_ratio=Axis("AX_RATIO", 0.1, 0.1, 10),
            angle=Axis("ANGLE", 0.0, 15.0, 12),
            logr=Axis("LOGR", -0.70, 0.12, 21),
            boxsize=128,
            has_index_axis=False,
        )

    @property
    def axes(self) -> tuple:
        return (self.index, self.ax_ratio, self.angle, self.logr)

    @property
    def shape(self) -> tuple:
        return tuple(a.count for a in self.axes)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def centre(self) -> int:
        """0-based array index (both axes) of the pixel on whose centre every model is centred."""
        return self.boxsize // 2

    def parameters(self, flat_index) -> dict:
        """Grid values (INDEX, AX_RATIO, ANGLE, LOGR) of flat full-grid indices."""
        idx = np.unravel_index(np.asarray(flat_index), self.shape)
        return {a.name: a.values[i] for a, i in zip(self.axes, idx)}

    def unique_models(self) -> tuple:
        """Representatives of the distinct models and the map from the full grid to them.

        Returns
        -------
        representatives : ndarray of int, shape (K_unique,)
            Flat full-grid index of each distinct model (the first of its class), ordered by
            `support_radius` and then by that index (`UNIQUE_ORDER`).
        inverse : ndarray of int, shape (size,)
            For every flat full-grid cell, the position of its model in ``representatives``.
        """
        if self._unique is None:
            n, q, a, r = np.meshgrid(*(ax.values for ax in self.axes), indexing="ij")
            round_ = np.abs(q - 1.0) < ROUND_TOLERANCE
            angle_key = np.where(round_, 0.0, np.round(np.mod(a, 180.0), 6))
            angle_key = np.where(np.abs(angle_key - 180.0) < 1e-6, 0.0, angle_key)
            keys = np.stack([np.round(n, 6), np.round(q, 6), angle_key, np.round(r, 6)], -1)
            keys = keys.reshape(-1, 4)
            _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
            reach = support_radius(n.ravel()[first], r.ravel()[first])
            order = np.lexsort((first, np.round(reach, 6)))     # by reach, then grid order
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            object.__setattr__(self, "_unique", (first[order], rank[inverse.ravel()]))
        return self._unique

    # -- FITS header round trip ------------------------------------------------------------
    def to_header_cards(self) -> list:
        """(key, value, comment) cards in the original DRE cube format."""
        cards = []
        for axis in self.axes:
            if axis.name == "INDEX" and not self.has_index_axis:
                continue
            nkey, key0, dkey = AXIS_KEYS[axis.name]
            cards += [
                (nkey, int(axis.count), f"number of {axis.name} values"),
                (key0, float(axis.start), f"first {axis.name} value"),
                (dkey, float(axis.step), f"{axis.name} step"),
            ]
        cards.append(("BOXSIZE", int(self.boxsize), "stamp side in pixels"))
        return cards

    @classmethod
    def from_header(cls, header, source: str = "model cube") -> "ModelGrid":
        """Build the grid from the keys of a DRE cube header; missing keys raise with their names."""
        missing = [k for name, keys in AXIS_KEYS.items() if name != "INDEX" for k in keys
                   if k not in header]
        if "BOXSIZE" not in header:
            missing.append("BOXSIZE")
        index_keys = AXIS_KEYS["INDEX"]
        present = [k for k in index_keys if k in header]
        if present and len(present) != 3:
            missing += [k for k in index_keys if k not in header]
        if missing:
            raise CubeFormatError(
                f"{source}: header lacks the DRE cube key(s) {', '.join(missing)} "
                f"(expected NAXRAT/AXRAT0/DAXRAT, NPOSANG/POSANG0/DPOSANG, NLOGH/LOGH0/DLOGH, "
                f"BOXSIZE and optionally NINDEX/INDEX0/DINDEX)")

        def axis(name):
            nkey, key0, dkey = AXIS_KEYS[name]
            try:
                return Axis(name, float(header[key0]), float(header[dkey]), int(header[nkey]))
            except (TypeError, ValueError) as exc:
                raise CubeFormatError(f"{source}: bad value for {name} keys {nkey}/{key0}/{dkey}: {exc}")
            except CubeFormatError as exc:
                raise CubeFormatError(f"{source}: {exc}")

        has_index = bool(present)
        index = axis("INDEX") if has_index else Axis("INDEX", 4.0, 0.0, 1)
        boxsize = int(header["BOXSIZE"])
        if boxsize < 8:
            raise CubeFormatError(f"{source}: BOXSIZE = {boxsize} is not a usable stamp size")
        return cls(index, axis("AX_RATIO"), axis("ANGLE"), axis("LOGR"), boxsize, has_index,
                   renderer=str(header.get("RENDERV", "")).strip(), source=str(source))
