"""Synthetic paired 4D-CT phantom: average CT (side A) and phase 0 (side B), in HU.

A respiratory thorax phantom. One breathing cycle is sampled at ``num_phases`` equally
spaced phases, and **phase 0 is END-INHALE**: the diaphragm is at its lowest, the lungs are
at their largest and least dense, and everything inside them is pulled down. Side A is the
voxel-wise mean of all phases (what a scanner's average CT shows: moving vessels smeared
along their path); side B is phase 0 alone, with sharp vessels. Both are written as int16
HU under the same file name.

Breathing model (Lujan et al., Med. Phys. 26:715, 1999, with n = 2): at phase k of N the
breathing fraction is

    f_k = cos^4(pi * k / N),    k = 0 .. N-1

so f_0 = 1 (end-inhale) and f = 0 at mid-cycle (end-exhale). cos^4 dwells near exhale, as
real breathing does; its mean over a cycle is 3/8. Every motion and density change below is
its end-inhale value times f_k.

Motion field (end-exhale is the reference; ``lung_to_exhale`` is its inverse):

* superior-inferior: each column of a lung is stretched along z between its apex cap, which
  stays put, and its diaphragm dome, which descends ``amplitude_mm * f`` (amplitude 10-20
  mm). The displacement falls linearly from the full amplitude at the diaphragm to zero at
  the apex, so lower-lobe tissue moves most, as in 4D-CT.
* anterior-posterior: each lung is stretched forward from its posterior edge, its front
  moving ``ap_growth_mm * f`` (3-6 % of its half-depth, about 2-5 mm).
* the chest wall, fat, ribs and spine do not move: the lungs slide along them.
* everything inside a lung (parenchyma, vessels) is warped with the field by sampling an
  end-exhale vessel map at the end-exhale position of every voxel (``scipy.ndimage``); the
  lesion, small, translates with the field at its centre.
* the heart follows the diaphragm by 25-40 % of its excursion, rigidly.

Anatomy, randomised per patient (sizes in mm, scaled with the body so that any field of
view works):

* body: elliptical thorax of soft tissue (40 HU) under a 5-15 mm fat layer (-100 HU), in
  air (-1000 HU); static.
* spine: vertebral body of cortical (700 HU) around cancellous bone (250 HU), discs
  (80 HU), a posterior arch around the spinal canal; oblique ribs (500 HU); static.
* lungs: parenchyma of -800 HU at end-exhale and -850 HU at end-inhale (more air in the
  same tissue), linear in f; inside them vessels of blood (50 HU), 6 mm across at the
  hilum and thinning linearly to nothing 110 mm from it, so the outermost lung shows none.
  The vessels follow the common zeros of two smooth random fields (5 mm correlation
  length): tortuous curves that cross and loop rather than branch, a cheap stand-in for
  the real tree. The parenchyma between them is uniform apart from the noise.
* heart (40 HU, blood pool 50 HU) on the left dome; lesion (30 HU sphere, 8-20 mm across)
  in a lower lobe, with no vessel running through it.

Image formation: every voxel is the mean of its structures over the slice thickness (a
rectangular slice profile), so thick slices show partial volume along z: edges that cut a
slice (diaphragm, heart, lesion, vessels, discs, rib edges) give intermediate values.
Structures described by their surfaces are averaged over the slab exactly; the vessels,
drawn on a map of 1-2 mm in-plane spacing, are averaged over an odd number of sub-slices
per slice (3 at 2.5 mm and at 6 mm slices). In-plane, voxels sample the anatomy at their
centres (edges are not blurred), except that vessel edges ramp over one map voxel. Then
independent Gaussian noise (10 HU sd) is added to every phase, so the average is smoother
than phase 0, as a real average CT is.

Arrays are canonical RAS+ ``(X, Y, Z)`` (X left -> right, Y posterior -> anterior,
Z inferior -> superior), float32 HU with integer values in the scanner range
[-1024, 3071]. Files go through ``data.volume_io`` with a DICOM-like storage affine.

With ``--write_all_phases`` side B holds every phase of the cycle instead of phase 0 alone
(phase K = frame K, phase 0 still end-inhale), as one 4D file per patient
(``--phase_layout 4d``) or one 3D file per phase, ``patient_<i>_phase<K>.nii.gz``
(``--phase_layout files``); side A stays the average of all phases, and phase 0 is the
same volume as without the flag.

Usage:
    python datasets/make_phantom.py --output_dir datasets/ct_phases_dataset
    python datasets/make_phantom.py --output_dir datasets/ct_phases_dataset --size seed --num_train 80
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

# `python datasets/make_phantom.py` puts datasets/, not the repository root, on sys.path;
# the root is where `data.volume_io` lives.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data.volume_io import new_volume_meta, read_volume, write_volume  # noqa: E402

logger = logging.getLogger(__name__)

HU = {
    "air": -1000.0,
    # Lung parenchyma at end-inhale (phase 0) and end-exhale. Tissue and blood keep their
    # mass while air comes and goes, so HU + 1000 scales with 1 / volume: the relation that
    # CT ventilation imaging rests on (Guerrero et al., Phys. Med. Biol. 51:777, 2006).
    # -800 -> -850 is a plausible figure, between a quiet breath (20 % more volume, -833)
    # and a deep one (50 % more, -867).
    "lung": -850.0,
    "lung_exhale": -800.0,
    "fat": -100.0,
    "spinal_canal": 15.0,
    "lesion": 30.0,
    "soft_tissue": 40.0,
    "blood": 50.0,
    "disc": 80.0,
    "cancellous_bone": 250.0,
    "rib": 500.0,
    "cortical_bone": 700.0,
}
SCANNER_RANGE_HU = (-1024.0, 3071.0)
NOISE_SD_HU = 10.0

# The vessels: zero sets of two random fields of this correlation length, whose radius
# tapers linearly from VESSEL_RADIUS_MM at the hilum to nothing VESSEL_REACH_MM away, so
# that the outermost lung, as on CT, shows no vessel.
VESSEL_CORRELATION_MM = 5.0
VESSEL_RADIUS_MM = 3.0
VESSEL_REACH_MM = 110.0
VESSEL_NOISE_SPACING_MM = 2.0  # the random fields are drawn on this grid, then interpolated
# The vessel map's in-plane spacing: the output's, clipped to this range. Coarser output
# voxels sample the map at their centres, as they sample every other structure in-plane.
VESSEL_MAP_SPACING_MM = (1.0, 2.0)


class GridSize(NamedTuple):
    shape: tuple[int, int, int]  # (X, Y, Z) voxels
    spacing_mm: tuple[float, float, float]  # (X, Y, Z)


# Both presets span a 350 mm field of view in-plane, a common thorax reconstruction FOV.
SIZES = {
    "small": GridSize((128, 128, 32), (350 / 128, 350 / 128, 6.0)),  # trains in minutes on a CPU
    "seed": GridSize((512, 512, 113), (350 / 512, 350 / 512, 2.5)),  # the users' seed data set
}
SPLIT_DIRS = ("trainA", "trainB", "testA", "testB")


def breathing_curve(num_phases: int) -> np.ndarray:
    """(num_phases,) fraction of the end-inhale excursion at each phase: cos^4(pi k / N).

    1 at phase 0 (end-inhale), 0 at mid-cycle (end-exhale); the Lujan model with n = 2.
    Phases k and N - k (inhaling and exhaling through the same point) are exactly equal.
    """
    k = np.arange(num_phases)
    return np.cos(np.pi * np.minimum(k, num_phases - k) / num_phases) ** 4


def lung_hu(inhale: np.ndarray | float) -> np.ndarray:
    """Lung parenchyma HU at breathing fraction(s) f: end-exhale's at 0, end-inhale's at 1."""
    return HU["lung_exhale"] + (HU["lung"] - HU["lung_exhale"]) * np.asarray(inhale, dtype=np.float32)


class Grid(NamedTuple):
    """Voxel-centre coordinates in mm of a canonical (X, Y, Z) volume centred on 0."""

    x: np.ndarray  # (X,) left -> right
    y: np.ndarray  # (Y,) posterior -> anterior
    z: np.ndarray  # (Z,) inferior -> superior
    spacing_mm: tuple[float, float, float]

    @classmethod
    def centred(cls, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> Grid:
        axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing_mm)]
        return cls(*axes, tuple(float(s) for s in spacing_mm))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    @property
    def extent_mm(self) -> np.ndarray:
        return np.array(self.shape) * np.array(self.spacing_mm)

    def plane(self) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y) x and y coordinates of every column of the volume."""
        return np.meshgrid(self.x, self.y, indexing="ij")


@dataclass(frozen=True)
class Lung:
    """One lung at end-exhale; how it moves is ``lung_to_exhale``'s inverse."""

    centre: tuple[float, float]  # (x, y) mm
    semi_axes: tuple[float, float]  # (x, y) mm of the axial footprint
    base_z: float  # the dome's rim (lowest point), mm
    dome_mm: float  # how far the dome's centre rises above its rim
    apex_z: float  # top of the lung, mm
    cap_mm: float  # how far the top falls from the centre of the footprint to its edge
    ap_growth_mm: float  # how far the lung's front moves forward at end-inhale
    hilum: tuple[float, float, float]  # (x, y, z) mm, where the vessels are thickest


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # (x, y, z) mm at end-exhale
    semi_axes: tuple[float, float, float]  # mm
    inhale_shift_mm: tuple[float, float]  # (y, z) translation at end-inhale


@dataclass(frozen=True)
class Anatomy:
    """One patient's geometry in mm, in canonical RAS+ coordinates (volume centre at 0)."""

    body_centre: tuple[float, float]  # (x, y)
    body_semi_axes: tuple[float, float]
    fat_mm: float
    cavity_semi_axes: tuple[float, float]  # thoracic cavity inside muscle and ribs, body's centre
    vertebra_centre: tuple[float, float]
    vertebra_radius_mm: float
    cortex_mm: float
    disc_period_mm: float
    disc_offset_mm: float
    rib_period_mm: float
    rib_offset_mm: float
    rib_slope: float  # ribs descend this many mm per mm towards anterior
    lungs: tuple[Lung, Lung]  # right (+X), left (-X)
    heart: Ellipsoid
    lesion: Ellipsoid
    lesion_lung: int  # index into lungs
    amplitude_mm: float  # diaphragm excursion, end-exhale to end-inhale


class VesselMap(NamedTuple):
    """Fraction of each voxel of a regular end-exhale grid that is vessel, 0 outside the lungs.

    Already averaged over the output slice thickness (``vessel_map_spacing``'s sub-slices
    per slice), so that sampling it at a voxel centre gives the slab's vessel fraction.
    """

    fraction: np.ndarray  # (I, J, K) float32 in [0, 1]
    origin_mm: tuple[float, float, float]  # centre of voxel (0, 0, 0)
    spacing_mm: tuple[float, float, float]


class Patient(NamedTuple):
    """Everything random about one patient, fitted to one output grid; ``render`` images it."""

    anatomy: Anatomy
    vessels: VesselMap
    grid: Grid


def sample_patient(rng: np.random.Generator, grid: Grid) -> Patient:
    """Draw one patient (anatomy, then vessels) for this grid.

    The anatomy depends on the grid's field of view and in-plane spacing only, and the
    vessels' course on the field of view only, so one seed on grids that differ only in
    slice thickness gives the same patient.
    """
    anatomy = sample_anatomy(rng, grid)
    return Patient(anatomy, sample_vessels(rng, anatomy, grid), grid)


def sample_anatomy(rng: np.random.Generator, grid: Grid) -> Anatomy:
    """Draw one patient's anatomy, fitted to the grid's field of view."""
    fov_x, fov_y, fov_z = grid.extent_mm
    z_bottom = -fov_z / 2
    # An adult thorax is 270-320 mm wide and 190-240 mm deep; shrink it in a small field of
    # view so that air always surrounds the body, as on a scanner.
    bx = min(rng.uniform(135, 160), 0.44 * fov_x)
    by = min(rng.uniform(95, 120), 0.40 * fov_y)
    cx, cy = rng.uniform(-0.02, 0.02) * fov_x, rng.uniform(-0.03, 0.02) * fov_y
    fat = min(rng.uniform(5, 15), 0.1 * by)
    wall = 0.12 * by  # chest-wall muscle and ribs
    cav_x, cav_y = bx - fat - wall, by - fat - wall
    amplitude = rng.uniform(10, 20)

    lungs = []
    for side in (+1, -1):  # right lung first; the right hemidiaphragm sits higher, over the liver
        base_z = z_bottom + rng.uniform(0.20, 0.26) * fov_z + (rng.uniform(5, 15) if side > 0 else 0.0)
        apex_z = z_bottom + rng.uniform(0.88, 0.95) * fov_z
        ax = rng.uniform(0.38, 0.44) * cav_x * (1.05 if side > 0 else 1.0)
        ay = rng.uniform(0.80, 0.92) * cav_y
        centre = (cx + side * 0.5 * cav_x, cy - 0.05 * cav_y)
        lungs.append(
            Lung(
                centre=centre,
                semi_axes=(ax, ay),
                base_z=base_z,
                dome_mm=rng.uniform(15, 25),
                apex_z=apex_z,
                cap_mm=rng.uniform(0.3, 0.4) * (apex_z - base_z),
                ap_growth_mm=rng.uniform(0.03, 0.06) * ay,
                # The hilum: medial, mid-depth, a little below mid-height.
                hilum=(centre[0] - side * 0.6 * ax, centre[1], base_z + 0.4 * (apex_z - base_z)),
            )
        )

    left = lungs[1]
    rx, ry = rng.uniform(0.36, 0.44) * cav_x, rng.uniform(0.42, 0.50) * cav_y
    rz = rng.uniform(0.8, 1.0) * rx
    heart = Ellipsoid(
        # The heart lies left of the midline (-X), behind the anterior chest wall, on the dome.
        centre=(
            cx - rng.uniform(0.1, 0.2) * cav_x,
            cy + cav_y - ry - rng.uniform(0.05, 0.12) * cav_y,
            left.base_z + left.dome_mm + 0.5 * rz,
        ),
        semi_axes=(rx, ry, rz),
        inhale_shift_mm=(0.0, -rng.uniform(0.25, 0.40) * amplitude),
    )

    lesion_lung = int(rng.integers(2))
    lung, side = lungs[lesion_lung], (+1, -1)[lesion_lung]
    radius = min(rng.uniform(4, 10), 0.2 * lung.semi_axes[0])
    # Lateral in a lower lobe, above the end-exhale dome, so it stays inside the lung and
    # clear of the heart; it moves as the lung tissue at its centre does.
    centre = (
        lung.centre[0] + side * rng.uniform(0.35, 0.5) * lung.semi_axes[0],
        lung.centre[1] + rng.uniform(-0.3, 0.3) * lung.semi_axes[1],
        lung.base_z + lung.dome_mm + radius + rng.uniform(10, 50),
    )
    lesion = Ellipsoid(centre, (radius, radius, radius), _inhale_shift(lung, amplitude, centre))

    return Anatomy(
        body_centre=(cx, cy),
        body_semi_axes=(bx, by),
        fat_mm=fat,
        cavity_semi_axes=(cav_x, cav_y),
        vertebra_centre=(cx, cy - 0.40 * by),
        vertebra_radius_mm=0.16 * by,
        # At least one voxel thick, so that the cortical shell shows on coarse grids.
        cortex_mm=max(2.5, min(grid.spacing_mm[:2])),
        disc_period_mm=rng.uniform(28, 34),
        disc_offset_mm=rng.uniform(0, 34),
        rib_period_mm=rng.uniform(25, 32),
        rib_offset_mm=rng.uniform(0, 32),
        rib_slope=rng.uniform(0.3, 0.6),
        lungs=tuple(lungs),
        heart=heart,
        lesion=lesion,
        lesion_lung=lesion_lung,
        amplitude_mm=amplitude,
    )


# -- motion ------------------------------------------------------------------------------------


def _lung_column(lung: Lung, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For end-exhale columns (x, y): r2 (< 1 inside the footprint), the dome's z, the top's z."""
    r2 = ((x - lung.centre[0]) / lung.semi_axes[0]) ** 2 + ((y - lung.centre[1]) / lung.semi_axes[1]) ** 2
    return r2, lung.base_z + lung.dome_mm * (1 - r2), lung.apex_z - lung.cap_mm * r2


def _ap_stretch(lung: Lung, inhale):
    """Factor by which the lung's depth grows at breathing fraction f, about its posterior edge."""
    return 1 + lung.ap_growth_mm * inhale / (2 * lung.semi_axes[1])


def lung_to_exhale(lung: Lung, amplitude_mm: float, inhale, x, y, z) -> tuple[np.ndarray, np.ndarray]:
    """Where the lung tissue at (x, y, z) mm at breathing fraction f sat at end-exhale.

    The forward motion: y is stretched by ``_ap_stretch`` about the lung's posterior edge;
    z is stretched, in each column, between the top (static) and the dome (down by
    amplitude_mm * f), so a point a fraction t of the way from top to dome moves down by
    t * amplitude_mm * f. x does not move. Valid inside the lung's footprint.

    Args:
        inhale: breathing fraction f in [0, 1] (a scalar or an array broadcasting with x, y, z).
        x, y, z: positions in mm at that phase, broadcastable.

    Returns:
        (y0, z0): end-exhale positions in mm.
    """
    posterior = lung.centre[1] - lung.semi_axes[1]
    y0 = posterior + (y - posterior) / _ap_stretch(lung, inhale)
    _, dome, top = _lung_column(lung, x, y0)
    stretch = amplitude_mm * inhale / (top - dome)
    return y0, (z + stretch * top) / (1 + stretch)


def _inhale_shift(lung: Lung, amplitude_mm: float, point: tuple[float, float, float]) -> tuple[float, float]:
    """(y, z) end-inhale translation of the lung tissue that sits at `point` at end-exhale."""
    x0, y0, z0 = point
    posterior = lung.centre[1] - lung.semi_axes[1]
    _, dome, top = _lung_column(lung, x0, y0)
    return float((y0 - posterior) * (_ap_stretch(lung, 1.0) - 1)), float(-amplitude_mm * (top - z0) / (top - dome))


# -- vessels -----------------------------------------------------------------------------------


def vessel_map_spacing(spacing_mm: tuple[float, float, float]) -> tuple[tuple[float, float, float], int]:
    """The vessel map's (x, y, z) spacing for an output grid, and its sub-slices per slice.

    In-plane: the output's, clipped to VESSEL_MAP_SPACING_MM. Along z: the slice
    thickness split into an odd number of sub-slices no thicker than the in-plane spacing, so
    that a centred box filter of that many sub-slices averages exactly one slice.
    """
    in_plane = float(np.clip(min(spacing_mm[:2]), *VESSEL_MAP_SPACING_MM))
    sub_slices = 2 * math.ceil((spacing_mm[2] / in_plane - 1) / 2) + 1
    return (in_plane, in_plane, spacing_mm[2] / sub_slices), sub_slices


def sample_vessels(rng: np.random.Generator, anatomy: Anatomy, grid: Grid) -> VesselMap:
    """Draw the lungs' vessels and rasterise them onto an end-exhale vessel map for this grid.

    A vessel fills the points closer to a random curve (``_distance_to_curves_mm``) than its
    radius, which tapers from the hilum outwards. The curves are drawn on a grid fixed in
    mm, so their course does not depend on the voxel size.
    """
    a = anatomy
    spacing, sub_slices = vessel_map_spacing(grid.spacing_mm)
    low = np.array(
        [
            *(min(lung.centre[i] - lung.semi_axes[i] for lung in a.lungs) for i in (0, 1)),
            min(lung.base_z for lung in a.lungs),
        ]
    )
    high = np.array(
        [
            *(max(lung.centre[i] + lung.semi_axes[i] for lung in a.lungs) for i in (0, 1)),
            max(lung.apex_z for lung in a.lungs),
        ]
    )
    # The map covers the lungs' box, and half a slice more above and below for the slab average.
    margin = np.array([spacing[0], spacing[1], spacing[2] * (sub_slices // 2 + 1)])
    origin = low - margin
    axes = [
        origin[i] + spacing[i] * np.arange(math.ceil((high[i] - low[i] + 2 * margin[i]) / spacing[i]) + 1)
        for i in range(3)
    ]
    distance = _distance_to_curves_mm(rng, low, high, axes)

    fraction = np.zeros(distance.shape, dtype=np.float32)
    x, y = np.meshgrid(axes[0], axes[1], indexing="ij")
    allowed = _lung_allowed(a, x, y)
    z = axes[2].astype(np.float32)
    for lung in a.lungs:
        r2, dome, top = _lung_column(lung, x, y)
        columns = np.nonzero((r2 < 1) & allowed)
        inside = (z >= dome[columns][:, None]) & (z < top[columns][:, None])  # (C, K)
        xh, yh, zh = lung.hilum
        from_hilum = np.sqrt(((x[columns] - xh) ** 2 + (y[columns] - yh) ** 2)[:, None] + (z - zh) ** 2)
        radius = VESSEL_RADIUS_MM * np.clip(1 - from_hilum / VESSEL_REACH_MM, 0, 1)
        # Edges ramp over one map voxel (partial volume in-plane). A vessel thinner than a
        # voxel is drawn with a radius of half a voxel and proportionally fainter, keeping
        # its cross-section (to within a third), so coarse grids do not thicken the vessels.
        drawn = np.maximum(radius, spacing[0] / 2)
        filled = np.clip((drawn - distance[columns]) / spacing[0] + 0.5, 0, 1) * (radius / drawn) ** 2
        fraction[columns] = np.where(inside, filled, 0)

    # No vessel runs through the lesion (nor just around it: the lesion moves as a whole).
    lesion = a.lesion
    clear = tuple(s + 3.0 for s in lesion.semi_axes)
    mesh = np.meshgrid(*axes, indexing="ij", sparse=True)
    fraction[sum(((axis - c) / s) ** 2 for axis, c, s in zip(mesh, lesion.centre, clear)) < 1] = 0
    fraction = ndimage.uniform_filter1d(fraction, sub_slices, axis=2, mode="constant")
    return VesselMap(fraction, tuple(float(o) for o in origin), spacing)


def _distance_to_curves_mm(
    rng: np.random.Generator, low: np.ndarray, high: np.ndarray, axes: list[np.ndarray]
) -> np.ndarray:
    """(I, J, K) float32: approximate distance in mm from each map point to random curves.

    Two independent smooth Gaussian fields n1, n2 (unit sd, correlation length l) are zero
    together along curves that wander, cross and loop; near them each field grows by about
    1 / l per mm, so sqrt(n1^2 + n2^2) * l approximates the distance to the nearest one. The
    fields are drawn on a coarse grid (l / 2.5 apart) over the box low..high (x, y, z mm),
    two steps beyond it, and interpolated at the map's axes.
    """
    step = VESSEL_NOISE_SPACING_MM
    noise_origin = low - 2 * step
    noise_shape = tuple(np.ceil((high - low) / step).astype(int) + 5)
    sigma = VESSEL_CORRELATION_MM / math.sqrt(2) / step  # a Gaussian filter of white noise: correlation length l
    positions = [(axis - noise_origin[i]) / step for i, axis in enumerate(axes)]
    distance = None
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.standard_normal(noise_shape, dtype=np.float32), sigma, truncate=3.0)
        squared = _interpolate(field / field.std(), positions) ** 2
        distance = squared if distance is None else distance + squared
    np.sqrt(distance, out=distance)
    distance *= VESSEL_CORRELATION_MM
    return distance


def _interpolate(values: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """values resampled, linearly and one axis at a time, at fractional indices positions[axis]."""
    for axis, position in enumerate(positions):
        size = values.shape[axis]
        position = np.clip(position, 0, size - 1)
        lower = np.minimum(np.floor(position).astype(np.intp), size - 2)
        weight = (position - lower).astype(np.float32).reshape([-1 if i == axis else 1 for i in range(values.ndim)])
        values = values.take(lower, axis) * (1 - weight) + values.take(lower + 1, axis) * weight
    return values


# -- static anatomy ----------------------------------------------------------------------------


def _ellipse_r2(x: np.ndarray, y: np.ndarray, centre, semi_axes) -> np.ndarray:
    """Squared normalised radius: < 1 inside the ellipse."""
    return ((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2


def _lung_allowed(anatomy: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(X, Y) bool: columns a lung may fill: inside the thoracic cavity, clear of the spine."""
    a = anatomy
    cavity = _ellipse_r2(x, y, a.body_centre, a.cavity_semi_axes) < 1
    xs, ys = a.vertebra_centre
    r = a.vertebra_radius_mm
    # The lungs wrap around the vertebral body but not into it or the muscles behind it.
    spine = (_ellipse_r2(x, y, (xs, ys), (r + 6, r + 6)) < 1) | ((np.abs(x - xs) < 0.8 * r + 6) & (y < ys))
    return cavity & ~spine


def _static_slice(anatomy: Anatomy, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) HU of the structures that are the same in every axial slice, each painted over the last.

    Returns the slice and the (X, Y) mask of the vertebral body (where discs go).
    """
    a = anatomy
    hu = np.full(x.shape, HU["air"], dtype=np.float32)
    hu[_ellipse_r2(x, y, a.body_centre, a.body_semi_axes) < 1] = HU["fat"]
    inner = (a.body_semi_axes[0] - a.fat_mm, a.body_semi_axes[1] - a.fat_mm)
    hu[_ellipse_r2(x, y, a.body_centre, inner) < 1] = HU["soft_tissue"]

    xs, ys = a.vertebra_centre
    r = a.vertebra_radius_mm
    by = a.body_semi_axes[1]
    canal_r = 0.07 * by
    canal = (xs, ys - r - canal_r - a.cortex_mm)  # behind the vertebral body
    spinous_process = ((xs, canal[1] - canal_r - 0.08 * by), (0.03 * by, 0.08 * by))
    hu[_ellipse_r2(x, y, *spinous_process) < 1] = HU["cortical_bone"]
    # The posterior arch: a bony ring around the spinal canal.
    hu[_ellipse_r2(x, y, canal, (canal_r + 0.05 * by, canal_r + a.cortex_mm)) < 1] = HU["cortical_bone"]
    hu[_ellipse_r2(x, y, canal, (canal_r, canal_r)) < 1] = HU["spinal_canal"]
    vertebral_body = _ellipse_r2(x, y, (xs, ys), (r, r)) < 1
    hu[vertebral_body] = HU["cortical_bone"]
    hu[_ellipse_r2(x, y, (xs, ys), (r - a.cortex_mm, r - a.cortex_mm)) < 1] = HU["cancellous_bone"]
    return hu, vertebral_body


def _rib_ring(anatomy: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(X, Y) mask of the chest-wall band the ribs run in, off the sternum and the spine."""
    a = anatomy
    cx, cy = a.body_centre
    cav_x, cav_y = a.cavity_semi_axes
    thickness = 0.08 * a.body_semi_axes[1]
    band = (_ellipse_r2(x, y, a.body_centre, a.cavity_semi_axes) >= 1) & (
        _ellipse_r2(x, y, a.body_centre, (cav_x + thickness, cav_y + thickness)) < 1
    )
    off_midline = np.abs(x - cx) > np.where(y > cy, 0.2 * cav_x, 0.25 * cav_x)
    return band & off_midline


def _band_coverage(
    z_mm: np.ndarray, period_mm: float, offset_mm: float, duty: float, thickness_mm: float
) -> np.ndarray:
    """Fraction of each slab [z - t/2, z + t/2] inside the bands (z - offset) mod period < duty * period."""

    def band_below(z: np.ndarray) -> np.ndarray:  # length of band below z, up to a constant
        turns = np.floor((z - offset_mm) / period_mm)
        return turns * duty * period_mm + np.clip(z - offset_mm - turns * period_mm, 0, duty * period_mm)

    half = thickness_mm / 2
    return ((band_below(z_mm + half) - band_below(z_mm - half)) / thickness_mm).astype(np.float32)


def _static_volume(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """(X, Y, Z) float32 HU of everything that does not breathe: body, fat, spine, ribs.

    Discs and ribs are the only static structures that change along z; each voxel gets the
    fraction of its slab that they fill (partial volume).
    """
    a = anatomy
    x, y = grid.plane()
    slice_hu, vertebral_body = _static_slice(a, x, y)
    volume = np.repeat(slice_hu[:, :, None], len(grid.z), axis=2)
    thickness = grid.spacing_mm[2]

    # Discs and ribs touch few columns: edit those (columns, Z) sub-arrays only.
    # A disc takes ~7 mm of each ~31 mm vertebral level, a rib ~11 mm of each ~28 mm.
    disc = _band_coverage(grid.z, a.disc_period_mm, a.disc_offset_mm, 0.22, thickness)  # (Z,)
    columns = volume[vertebral_body]
    volume[vertebral_body] = columns + disc * (HU["disc"] - columns)

    ring = _rib_ring(a, x, y)
    # A rib at height z posteriorly is lower by rib_slope * dy further anterior.
    rib_z = grid.z[None, :] + a.rib_slope * (y[ring][:, None] - a.body_centre[1])
    rib = _band_coverage(rib_z, a.rib_period_mm, a.rib_offset_mm, 0.4, thickness)
    columns = volume[ring]
    volume[ring] = columns + rib * (HU["rib"] - columns)
    return volume


# -- breathing structures ----------------------------------------------------------------------


class Intervals(NamedTuple):
    """Per phase and (x, y) column, the z-range [lo, hi) in mm that a structure fills.

    Both are (K, X, Y) float32; an empty column has lo >= hi. Every moving structure here
    is convex along z, so one interval per column describes it exactly.
    """

    lo: np.ndarray
    hi: np.ndarray

    def __and__(self, other: Intervals) -> Intervals:
        return Intervals(np.maximum(self.lo, other.lo), np.minimum(self.hi, other.hi))


def _masked(lo: np.ndarray, hi: np.ndarray, inside: np.ndarray) -> Intervals:
    return Intervals(
        np.where(inside, lo, np.inf).astype(np.float32, copy=False),
        np.where(inside, hi, -np.inf).astype(np.float32, copy=False),
    )


def _lung_intervals(lung: Lung, amplitude_mm: float, x, y, allowed: np.ndarray, inhale: np.ndarray) -> Intervals:
    """The lung between its diaphragm dome (below) and its apex cap (above), per phase:
    the end-exhale lung carried by the motion field of ``lung_to_exhale``."""
    f = inhale[:, None, None]  # (K, 1, 1)
    posterior = lung.centre[1] - lung.semi_axes[1]
    r2, dome, top = _lung_column(lung, x, posterior + (y - posterior) / _ap_stretch(lung, f))
    return _masked(dome - amplitude_mm * f, top, (r2 < 1) & allowed)


def _ellipsoid_intervals(solid: Ellipsoid, x, y, footprint: np.ndarray, inhale: np.ndarray) -> Intervals:
    """An ellipsoid translated by inhale_shift_mm * f at breathing fraction f, per phase."""
    f = inhale[:, None, None]  # (K, 1, 1)
    rx, ry, rz = solid.semi_axes
    shift_y, shift_z = solid.inhale_shift_mm
    r2 = ((x - solid.centre[0]) / rx) ** 2 + ((y - solid.centre[1] - shift_y * f) / ry) ** 2
    half = rz * np.sqrt(np.clip(1 - r2, 0, None))
    z = solid.centre[2] + shift_z * f
    return _masked(z - half, z + half, (half > 0) & footprint)


def _moving_terms(anatomy: Anatomy, grid: Grid, inhale: np.ndarray) -> list[tuple[np.ndarray, Intervals]]:
    """(weight_hu per phase, intervals) terms that paint the breathing structures onto soft tissue.

    Painting lungs, then heart, then lesion (each over the last) is written as a sum of
    interval indicators [.] so that phases can be averaged term by term:

        HU - soft = (lung_k - soft) ([L] - [L & H]) + (blood - soft) [B] + (lesion - lung_k) ([S] - [S & H])

    with lung_k the parenchyma at phase k, L either lung, H the heart (soft tissue itself),
    B its blood pool (inside H) and S the lesion clipped to its lung. The vessels inside the
    lungs are added by ``_vessel_volume``.
    """
    a = anatomy
    x, y = grid.plane()
    allowed = _lung_allowed(a, x, y)
    cavity = _ellipse_r2(x, y, a.body_centre, a.cavity_semi_axes) < 1
    lungs = [_lung_intervals(lung, a.amplitude_mm, x, y, allowed, inhale) for lung in a.lungs]
    heart = _ellipsoid_intervals(a.heart, x, y, cavity, inhale)
    blood_pool = Ellipsoid(a.heart.centre, tuple(0.6 * s for s in a.heart.semi_axes), a.heart.inhale_shift_mm)
    blood = _ellipsoid_intervals(blood_pool, x, y, cavity, inhale)
    lesion = _ellipsoid_intervals(a.lesion, x, y, cavity, inhale) & lungs[a.lesion_lung]

    lung_hu_k = lung_hu(inhale) - HU["soft_tissue"]  # (K,)
    lesion_hu_k = HU["lesion"] - lung_hu(inhale)
    blood_hu_k = np.full_like(inhale, HU["blood"] - HU["soft_tissue"], dtype=np.float32)
    return [
        *[(lung_hu_k, lung) for lung in lungs],
        *[(-lung_hu_k, lung & heart) for lung in lungs],
        (blood_hu_k, blood),
        (lesion_hu_k, lesion),
        (-lesion_hu_k, lesion & heart),
    ]


def _render(terms: list[tuple[np.ndarray, Intervals]], grid: Grid) -> np.ndarray:
    """(X, Y, Z) float32: each term's weight_hu times the fraction of each voxel's slab that
    the term's interval covers, averaged over the phases and summed over terms.

    Instead of painting one volume per phase, each interval end adds a step to a difference
    array, which one cumulative sum along Z turns into the painted volume: one pass over the
    volume however many phases are averaged. A step at a boundary that cuts a slice is
    split between that voxel and the next in proportion (partial volume).
    """
    nx, ny, nz = grid.shape
    column_start = np.arange(nx * ny, dtype=np.int64).reshape(nx, ny) * nz
    difference = np.zeros(nx * ny * nz, dtype=np.float32)
    for weight_hu, intervals in terms:
        num_phases = len(intervals.lo)
        weight = np.broadcast_to(
            (np.asarray(weight_hu, dtype=np.float32) / num_phases)[:, None, None], intervals.lo.shape
        )
        filled = intervals.lo < intervals.hi
        start = np.broadcast_to(column_start, filled.shape)[filled]
        for edge, sign in ((intervals.lo, 1), (intervals.hi, -1)):
            _add_step(difference, start, edge[filled], sign * weight[filled], grid)
    difference = difference.reshape(nx, ny, nz)
    return np.cumsum(difference, axis=2, out=difference)


def _add_step(
    difference: np.ndarray, column_start: np.ndarray, z_mm: np.ndarray, weight: np.ndarray, grid: Grid
) -> None:
    """Add, in place, the slab-averaged differences of weight * [z >= z_mm] along each column.

    With u the step's position in voxels from the bottom of the first slab, voxel floor(u)
    is covered 1 - frac(u) and the ones above it fully: differences of 1 - frac(u) at floor(u)
    and frac(u) at floor(u) + 1.
    """
    nz = len(grid.z)
    u = np.clip((z_mm - grid.z[0]) / grid.spacing_mm[2] + 0.5, 0, nz)
    first = np.floor(u).astype(np.int64)
    part = (u - first).astype(np.float32)
    lands = first < nz
    np.add.at(difference, column_start[lands] + first[lands], weight[lands] * (1 - part[lands]))
    lands = first + 1 < nz
    np.add.at(difference, column_start[lands] + first[lands] + 1, weight[lands] * part[lands])


def _vessel_volume(patient: Patient, inhale: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32: the vessels' HU above the parenchyma, averaged over the phases.

    At each phase every voxel that a lung may reach looks up the vessel map at its end-exhale
    position (``lung_to_exhale``): the vessels move with the lung. Where the heart sits at
    that phase there is no lung, so no vessel.
    """
    a, grid, vessels = patient.anatomy, patient.grid, patient.vessels
    x, y = grid.plane()
    allowed = _lung_allowed(a, x, y)
    heart = a.heart
    heart_half = heart.semi_axes[2] * np.sqrt(
        np.clip(1 - _ellipse_r2(x, y, heart.centre[:2], heart.semi_axes[:2]), 0, None)
    )
    # Phases that breathe alike (k and N - k) look alike: sample each fraction once.
    fractions, repeats = np.unique(inhale, return_counts=True)
    weights = repeats / len(inhale)
    volume = np.zeros(grid.shape, dtype=np.float32)
    for lung in a.lungs:
        columns, z_index = _lung_reach(lung, a.amplitude_mm, grid, allowed, fractions.max())
        xc, yc, z = x[columns][:, None], y[columns][:, None], grid.z[z_index][None, :]  # (C, 1), (C, 1), (1, Zr)
        in_heart = heart_half[columns][:, None]  # (C, 1) the heart's half-height (it moves along z only)
        coordinates = np.empty((3, len(xc), len(z_index)), dtype=np.float32)  # vessel-map voxel indices
        coordinates[0] = (xc - vessels.origin_mm[0]) / vessels.spacing_mm[0]
        total = np.zeros(coordinates.shape[1:], dtype=np.float32)
        for f, weight in zip(fractions, weights):
            y0, z0 = lung_to_exhale(lung, a.amplitude_mm, f, xc, yc, z)
            coordinates[1] = (y0 - vessels.origin_mm[1]) / vessels.spacing_mm[1]
            coordinates[2] = (z0 - vessels.origin_mm[2]) / vessels.spacing_mm[2]
            fraction = ndimage.map_coordinates(vessels.fraction, coordinates, order=1, prefilter=False)
            fraction[np.abs(z - heart.centre[2] - heart.inhale_shift_mm[1] * f) < in_heart] = 0
            total += fraction * np.float32(weight * (HU["blood"] - lung_hu(f)))
        volume[columns[0][:, None], columns[1][:, None], z_index[None, :]] += total
    return volume


def _lung_reach(
    lung: Lung, amplitude_mm: float, grid: Grid, allowed: np.ndarray, inhale_max: float
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The columns (two index arrays) and slices (indices) a lung may fill at fractions 0..inhale_max.

    Columns: the union of the end-exhale and the deepest footprint (the front moves forward
    and the sides slide forward a little, so neither contains the other). Slices: from the
    lowest dome to the apex, and one slice beyond each for the slab average.
    """
    x, y = grid.plane()
    extremes = np.array([0.0, inhale_max], dtype=np.float32)
    footprint = (_lung_intervals(lung, amplitude_mm, x, y, allowed, extremes).lo < np.inf).any(axis=0)
    thickness = grid.spacing_mm[2]
    lowest = lung.base_z - amplitude_mm * inhale_max
    z_index = np.nonzero((grid.z > lowest - thickness) & (grid.z < lung.apex_z + thickness))[0]
    return np.nonzero(footprint), z_index


def render(patient: Patient, inhale: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32 HU without noise: the mean of the phases at these breathing fractions.

    ``render(patient, [1.0])`` is end-inhale, ``render(patient, [0.0])`` end-exhale,
    ``render(patient, breathing_curve(N))`` the average CT. Each phase is averaged over the
    slice thickness. Values are not rounded.
    """
    return _static_volume(patient.anatomy, patient.grid) + _breathing_volume(patient, np.asarray(inhale, np.float32))


def _breathing_volume(patient: Patient, inhale: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32: what the breathing structures add to the static volume, mean over phases."""
    volume = _render(_moving_terms(patient.anatomy, patient.grid, inhale), patient.grid)
    volume += _vessel_volume(patient, inhale)
    return volume


def _add_phase_noise(
    rng: np.random.Generator, average: np.ndarray, phase0: np.ndarray, num_phases: int, sd_hu: float
) -> None:
    """Add, in place, the noise left by averaging num_phases independently noisy phases.

    Phase 0 keeps its own noise n_0; the average gets (n_0 + n_1 + ... + n_{N-1}) / N. The
    sum of the other N-1 phases' noise is drawn as one field of sd sqrt(N-1) * sd_hu: the
    same distribution, for two full-volume draws instead of N.
    """
    noise = rng.standard_normal(phase0.shape, dtype=np.float32)
    noise *= sd_hu
    phase0 += noise
    noise /= num_phases
    average += noise
    noise = rng.standard_normal(phase0.shape, dtype=np.float32)
    noise *= sd_hu * np.sqrt(num_phases - 1) / num_phases
    average += noise


def make_patient(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    num_phases: int,
    noise_sd_hu: float = NOISE_SD_HU,
) -> tuple[np.ndarray, np.ndarray]:
    """One random patient: its average CT and its phase 0 (end-inhale).

    Args:
        rng: source of the anatomy, then of the vessels, then of the noise; the same seed
            gives the same patient, and noise_sd_hu=0 gives the same patient without noise.
        shape: (X, Y, Z) voxels.
        spacing_mm: (X, Y, Z) voxel size in mm.
        num_phases: phases in the breathing cycle, >= 1.
        noise_sd_hu: Gaussian noise in each phase, HU.

    Returns:
        (average_hu, phase0_hu): canonical RAS+ (X, Y, Z) float32 arrays of integer HU in
        [-1024, 3071].
    """
    patient = sample_patient(rng, Grid.centred(shape, spacing_mm))
    inhale = breathing_curve(num_phases).astype(np.float32)
    static = _static_volume(patient.anatomy, patient.grid)
    breathing0 = _breathing_volume(patient, inhale[:1])
    average = breathing0.copy()
    if num_phases > 1:  # the mean of all phases, without rendering phase 0 twice
        average += (num_phases - 1) * _breathing_volume(patient, inhale[1:])
        average /= num_phases
    average += static
    phase0 = static + breathing0
    if noise_sd_hu > 0:
        _add_phase_noise(rng, average, phase0, num_phases, noise_sd_hu)
    for volume in (average, phase0):
        np.rint(volume, out=volume)
        np.clip(volume, *SCANNER_RANGE_HU, out=volume)
    return average, phase0


def make_patient_phases(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    num_phases: int,
    noise_sd_hu: float = NOISE_SD_HU,
) -> tuple[np.ndarray, np.ndarray]:
    """One random patient's whole breathing cycle and its average CT.

    The same ``rng`` state gives the same patient as :func:`make_patient`, and the same phase 0
    (noise included: phase 0's noise is drawn first, as there). Each other phase is rendered
    on its own with its own noise, and the average is the mean of the phases as written (so
    its noise is another draw than :func:`make_patient`'s, of the same distribution).

    Returns:
        ``(average_hu, phases_hu)``: (X, Y, Z) and (X, Y, Z, N) float32 arrays of integer HU
        in [-1024, 3071]; ``phases_hu[..., k]`` is phase k (0 = end-inhale).
    """
    patient = sample_patient(rng, Grid.centred(shape, spacing_mm))
    inhale = breathing_curve(num_phases).astype(np.float32)
    static = _static_volume(patient.anatomy, patient.grid)
    phases = np.empty((*static.shape, num_phases), dtype=np.float32)
    for k in range(num_phases):
        phases[..., k] = static + _breathing_volume(patient, inhale[k : k + 1])
        if noise_sd_hu > 0:
            phases[..., k] += noise_sd_hu * rng.standard_normal(static.shape, dtype=np.float32)
    np.rint(phases, out=phases)
    np.clip(phases, *SCANNER_RANGE_HU, out=phases)
    # The mean of the phases as written (whole HU, clipped), so that A is their average to 0.5 HU.
    average = np.rint(phases.mean(axis=-1))
    return average, phases


def body_mask(volume_hu: np.ndarray, air_threshold_hu: float = -500.0) -> np.ndarray:
    """(X, Y, Z) bool: voxels inside the body's outline in their axial slice, lungs included.

    Tissue above the threshold, with holes filled slice by slice: the lungs are holes inside
    the outline of every axial slice, but a 3D fill would miss those that reach the top or
    bottom of the volume.
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(volume_hu > air_threshold_hu, structure=in_plane)


def storage_affine(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """(4, 4) storage voxel -> RAS mm affine like a DICOM-derived file's, centred on the volume.

    Storage rows run right -> left and columns anterior -> posterior (diag(-sx, -sy, sz)),
    slices inferior -> superior; the central voxel sits at (0, 0, 0) mm.
    """
    affine = np.diag([-spacing_mm[0], -spacing_mm[1], spacing_mm[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


class PhantomPair(NamedTuple):
    average_path: Path  # side A
    phase0_path: Path  # side B
    mean_abs_diff_body_hu: float  # mean |A - B| inside the body


def write_dataset(
    output_dir: str | Path,
    num_train: int,
    num_test: int,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    num_phases: int,
    seed: int,
    overwrite: bool = False,
    phase_layout: str | None = None,
) -> list[PhantomPair]:
    """Write num_train + num_test phantom pairs as trainA/trainB/testA/testB/patient_<i>.nii.gz.

    ``phase_layout`` None writes phase 0 alone as side B; ``"4d"`` or ``"files"`` write every
    phase there (:data:`PHASE_LAYOUTS`), and each pair's ``phase0_path`` is then the 4D file
    or the phase-0 file.

    Each split numbers its patients from 1, as the reference's layout does (testA/patient_1
    is a different patient from trainA/patient_1). Patient k of the whole set (train ones
    first) depends only on (seed, k).

    Raises:
        FileExistsError: output_dir is not empty and overwrite is False. With overwrite,
            stale patient_*.nii.gz files in the four split folders are removed first, so
            the folder holds exactly this data set.
    """
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, overwrite)
    meta = new_volume_meta(affine=storage_affine(shape, spacing_mm), shape=shape)
    patient_seeds = np.random.SeedSequence(seed).spawn(num_train + num_test)
    pairs = []
    for number, patient_seed in enumerate(patient_seeds, start=1):
        split = "train" if number <= num_train else "test"
        name = f"patient_{number if split == 'train' else number - num_train}.nii.gz"
        if phase_layout is None:
            average, phase0 = make_patient(np.random.default_rng(patient_seed), shape, spacing_mm, num_phases)
            path_b = write_volume(output_dir / f"{split}B" / name, phase0, meta, dtype="int16")
        else:
            average, phases = make_patient_phases(np.random.default_rng(patient_seed), shape, spacing_mm, num_phases)
            phase0 = phases[..., 0]
            path_b = write_phases(output_dir / f"{split}B" / name, phases, meta, phase_layout)
        path_a = write_volume(output_dir / f"{split}A" / name, average, meta, dtype="int16")
        diff_hu = float(np.abs(average - phase0)[body_mask(phase0)].mean())
        logger.info("%s/%s: mean |A - B| inside the body %.1f HU", split, name, diff_hu)
        pairs.append(PhantomPair(path_a, path_b, diff_hu))
    return pairs


# How --write_all_phases stores a patient's phases in side B (both read by data/phases.py).
PHASE_LAYOUTS = {
    "4d": "one 4D file per patient, frame K = phase K",
    "files": "one 3D file per phase, patient_<i>_phase<K>.nii.gz",
}


def write_phases(path: Path, phases: np.ndarray, meta, layout: str) -> Path:
    """Write (X, Y, Z, N) phases as ``path`` (4D) or as ``<stem>_phase<K>.nii.gz`` files;
    returns the file that holds phase 0."""
    if layout not in PHASE_LAYOUTS:
        raise ValueError(f"phase layout must be one of {sorted(PHASE_LAYOUTS)}, got {layout!r}")
    if layout == "4d":
        return write_volume(path, phases, meta, dtype="int16")
    stem = path.name.removesuffix(".nii.gz")
    written = [
        write_volume(path.with_name(f"{stem}_phase{k}.nii.gz"), phases[..., k], meta, dtype="int16")
        for k in range(phases.shape[-1])
    ]
    return written[0]


# Where misregister_train_targets keeps the registered training targets (the truth).
TRUE_TARGET_DIR = "trueB"


def misregister(volume_hu: np.ndarray, rng: np.random.Generator, shift_vox: float, rotation_deg: float,
                fill_hu: float = HU["air"]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``volume_hu`` moved rigidly in the axial plane, as a patient who shifted between two scans.

    A rotation about the volume's central SI axis by an angle drawn uniformly in
    ±``rotation_deg``, then a shift drawn uniformly in ±``shift_vox`` voxels along X and along
    Y; linear interpolation, air where the moved volume leaves the grid, whole HU.

    Returns:
        ``(moved, (shift_x_vox, shift_y_vox, angle_deg))``: (X, Y, Z) float32 and what was drawn.
    """
    angle_deg = float(rng.uniform(-rotation_deg, rotation_deg))
    shift = rng.uniform(-shift_vox, shift_vox, size=2)
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    centre = (np.asarray(volume_hu.shape, dtype=float) - 1) / 2
    offset_out = np.array([shift[0], shift[1], 0.0])
    # affine_transform maps output voxels to input voxels: input = R^-1 (output - centre - shift) + centre.
    inverse = rotation.T
    offset = centre - inverse @ (centre + offset_out)
    moved = ndimage.affine_transform(volume_hu, inverse, offset=offset, order=1, mode="constant", cval=fill_hu)
    return np.rint(moved).astype(np.float32), (float(shift[0]), float(shift[1]), angle_deg)


def misregister_train_targets(output_dir: str | Path, shift_vox: float, rotation_deg: float, seed: int) -> list[Path]:
    """Move every ``trainB/`` volume rigidly (:func:`misregister`), keeping the registered one in ``trueB/``.

    Training pairs are then no longer registered voxel to voxel (as average and phase volumes
    from different reconstructions or acquisitions often are), while ``testB/`` stays the true,
    registered phase 0 of the test patients, so test.py and validation score against the truth.
    Each patient's motion depends only on (seed, file name).

    Returns:
        The moved ``trainB/`` files.
    """
    output_dir = Path(output_dir)
    (output_dir / TRUE_TARGET_DIR).mkdir(parents=True, exist_ok=True)
    moved_paths = []
    for path in sorted((output_dir / "trainB").glob("patient_*.nii.gz")):
        volume, meta = read_volume(path)
        write_volume(output_dir / TRUE_TARGET_DIR / path.name, volume, meta, dtype="int16")
        rng = np.random.default_rng([seed, zlib.crc32(path.name.encode())])
        moved, (dx, dy, angle) = misregister(volume, rng, shift_vox, rotation_deg)
        write_volume(path, moved, meta, dtype="int16")
        logger.info("trainB/%s: moved %.1f, %.1f voxels and %.1f degrees (registered copy in %s/)", path.name, dx, dy,
                    angle, TRUE_TARGET_DIR)
        moved_paths.append(path)
    return moved_paths


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} is not empty; pass --overwrite to replace its phantom, or choose another --output_dir"
            )
        for split_dir in SPLIT_DIRS:
            for stale in (output_dir / split_dir).glob("patient_*.nii.gz"):
                stale.unlink()
    for split_dir in SPLIT_DIRS:
        (output_dir / split_dir).mkdir(parents=True, exist_ok=True)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a synthetic paired 4D-CT phantom: A = average CT, B = phase 0 (end-inhale), int16 HU NIfTI.",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("datasets/ct_phases_dataset"))
    parser.add_argument("--num_train", type=_int_at_least(1), default=8, help="train pairs (patient_1 ..)")
    parser.add_argument(
        "--num_test", type=_int_at_least(0), default=2, help="test pairs (patient_1 .. in testA/testB)"
    )
    parser.add_argument(
        "--size",
        default="small",
        choices=sorted(SIZES),
        help="small: 128x128x32 at 2.7x2.7x6 mm (trains in minutes on a CPU); seed: 512x512x113 at 0.68x0.68x2.5 mm",
    )
    parser.add_argument(
        "--shape", type=_int_at_least(8), nargs=3, metavar=("X", "Y", "Z"), help="override --size's grid"
    )
    parser.add_argument(
        "--spacing_mm", type=_positive_float, nargs=3, metavar=("SX", "SY", "SZ"), help="override --size's voxel size"
    )
    parser.add_argument("--num_phases", type=_int_at_least(2), default=10, help="phases in the breathing cycle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the phantom in a non-empty --output_dir")
    parser.add_argument(
        "--write_all_phases",
        action="store_true",
        help="side B holds every phase of the cycle (phase 0 = end-inhale first), not phase 0 alone",
    )
    parser.add_argument(
        "--phase_layout",
        default="4d",
        choices=sorted(PHASE_LAYOUTS),
        help="with --write_all_phases: " + "; ".join(f"{k}: {v}" for k, v in PHASE_LAYOUTS.items()),
    )
    parser.add_argument(
        "--misregister",
        type=float,
        nargs=2,
        metavar=("SHIFT_VOX", "ROTATION_DEG"),
        help="move each trainB/ volume rigidly by up to SHIFT_VOX voxels along X and Y and ROTATION_DEG degrees "
        "about the SI axis (drawn per patient), keeping the registered ones in trueB/; testB/ stays registered. "
        "Unregistered pairs for --model cycle_gan",
    )
    return parser


def main(opt: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preset = SIZES[opt.size]
    shape = tuple(opt.shape or preset.shape)
    spacing_mm = tuple(opt.spacing_mm or preset.spacing_mm)
    try:
        pairs = write_dataset(
            opt.output_dir, opt.num_train, opt.num_test, shape, spacing_mm, opt.num_phases, opt.seed, opt.overwrite,
            phase_layout=opt.phase_layout if opt.write_all_phases else None,
        )
    except FileExistsError as error:
        print(f"make_phantom.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if opt.misregister:
        if opt.write_all_phases:
            print("make_phantom.py: error: --misregister moves phase 0 alone; leave out --write_all_phases", file=sys.stderr)
            raise SystemExit(2)
        misregister_train_targets(opt.output_dir, *opt.misregister, seed=opt.seed)
        print(f"trainB/ moved by up to {opt.misregister[0]:g} voxels and {opt.misregister[1]:g} degrees; "
              f"registered copies in {TRUE_TARGET_DIR}/")

    mean_diff_hu = np.mean([pair.mean_abs_diff_body_hu for pair in pairs])
    print(f"Wrote {opt.num_train} train + {opt.num_test} test pairs to {opt.output_dir}/{{trainA,trainB,testA,testB}}")
    print(
        f"grid {' x '.join(map(str, shape))} voxels at {' x '.join(f'{s:.2f}' for s in spacing_mm)} mm, "
        f"{opt.num_phases} breathing phases, seed {opt.seed}"
    )
    if opt.write_all_phases:
        print(f"side B: all {opt.num_phases} phases ({PHASE_LAYOUTS[opt.phase_layout]}), phase 0 = end-inhale")
    print(
        f"mean |A - B| inside the body: {mean_diff_hu:.1f} HU (A = average CT, B = phase 0; mean over n = {len(pairs)})"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
