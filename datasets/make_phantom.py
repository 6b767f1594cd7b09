"""Synthetic paired 4D-CT phantom: average CT (side A) and phase 0 (side B), in HU.

A respiratory thorax phantom. One breathing cycle is sampled at ``num_phases`` equally
spaced phases, and **phase 0 is END-INHALE**: the diaphragm is at its lowest, the lungs are
at their largest, and the heart and the lung lesion are pulled down with the diaphragm.
Side A is the voxel-wise mean of all phases (what a scanner's average CT shows); side B is
phase 0 alone. Both are written as int16 HU under the same file name.

Breathing model (Lujan et al., Med. Phys. 26:715, 1999, with n = 2): at phase k of N the
diaphragm sits ``amplitude_mm * f_k`` below its end-exhale position, where

    f_k = cos^4(pi * k / N),    k = 0 .. N-1

so f_0 = 1 (end-inhale) and f = 0 at mid-cycle (end-exhale). cos^4 dwells near exhale, as
real breathing does; its mean over a cycle is 3/8, so the average CT's diaphragm sits about
0.6 * amplitude above phase 0's. Every moving structure moves by a fixed fraction of f_k.

Anatomy, randomised per patient (sizes in mm, scaled with the body so that any field of
view works):

* body: elliptical thorax of soft tissue (40 HU) under a 5-15 mm fat layer (-100 HU), in
  air (-1000 HU); static.
* spine: vertebral body of cortical (700 HU) around cancellous bone (250 HU), discs
  (80 HU), a posterior arch around the spinal canal; oblique ribs (500 HU); static.
* lungs (-850 HU): the diaphragm dome (their inferior boundary) descends by
  ``amplitude_mm * f_k`` (amplitude 10-20 mm), and they widen 3-6 % anterior-posteriorly.
* heart (40 HU, blood pool 50 HU): follows the diaphragm by 25-40 % of its excursion.
* lesion (30 HU sphere, 8-20 mm across) in a lower lobe: follows it by 60-90 %.
* noise: independent Gaussian noise (10 HU sd) in every phase, so the average is smoother
  than phase 0, as a real average CT is.

Arrays are canonical RAS+ ``(X, Y, Z)`` (X left -> right, Y posterior -> anterior,
Z inferior -> superior), float32 HU with integer values in the scanner range
[-1024, 3071]. Files go through ``data.volume_io`` with a DICOM-like storage affine.

Usage:
    python datasets/make_phantom.py --output_dir datasets/ct_phases_dataset
    python datasets/make_phantom.py --output_dir datasets/ct_phases_dataset --size seed --num_train 80
"""

from __future__ import annotations

import argparse
import logging
import sys
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

from data.volume_io import new_volume_meta, write_volume  # noqa: E402

logger = logging.getLogger(__name__)

HU = {
    "air": -1000.0,
    "lung": -850.0,
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
    """
    return np.cos(np.pi * np.arange(num_phases) / num_phases) ** 4


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
    centre: tuple[float, float]  # (x, y) mm
    semi_axes: tuple[float, float]  # (x, y) mm of the axial footprint at end-exhale
    base_z: float  # the dome's rim (lowest point) at end-exhale, mm
    dome_mm: float  # how far the dome's centre rises above its rim
    apex_z: float  # top of the lung, mm
    cap_mm: float  # how far the top falls from the centre of the footprint to its edge
    ap_growth_mm: float  # extra y semi-axis at end-inhale


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # (x, y, z) mm at end-exhale
    semi_axes: tuple[float, float, float]  # mm
    descent_mm: float  # how far it moves down at end-inhale


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
        ay = rng.uniform(0.80, 0.92) * cav_y
        lungs.append(
            Lung(
                centre=(cx + side * 0.5 * cav_x, cy - 0.05 * cav_y),
                semi_axes=(rng.uniform(0.38, 0.44) * cav_x * (1.05 if side > 0 else 1.0), ay),
                base_z=base_z,
                dome_mm=rng.uniform(15, 25),
                apex_z=apex_z,
                cap_mm=rng.uniform(0.3, 0.4) * (apex_z - base_z),
                ap_growth_mm=rng.uniform(0.03, 0.06) * ay,
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
        descent_mm=rng.uniform(0.25, 0.40) * amplitude,
    )

    lesion_lung = int(rng.integers(2))
    lung, side = lungs[lesion_lung], (+1, -1)[lesion_lung]
    radius = min(rng.uniform(4, 10), 0.2 * lung.semi_axes[0])
    lesion = Ellipsoid(
        # Lateral in a lower lobe, above the end-exhale dome, so it stays inside the lung
        # (its lung's dome always descends further than it does) and clear of the heart.
        centre=(
            lung.centre[0] + side * rng.uniform(0.35, 0.5) * lung.semi_axes[0],
            lung.centre[1] + rng.uniform(-0.3, 0.3) * lung.semi_axes[1],
            lung.base_z + lung.dome_mm + radius + rng.uniform(10, 50),
        ),
        semi_axes=(radius, radius, radius),
        descent_mm=rng.uniform(0.6, 0.9) * amplitude,
    )

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


def _ellipse_r2(x: np.ndarray, y: np.ndarray, centre, semi_axes) -> np.ndarray:
    """Squared normalised radius: < 1 inside the ellipse."""
    return ((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2


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


def _static_volume(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """(X, Y, Z) float32 HU of everything that does not breathe: body, fat, spine, ribs."""
    a = anatomy
    x, y = grid.plane()
    slice_hu, vertebral_body = _static_slice(a, x, y)
    volume = np.repeat(slice_hu[:, :, None], len(grid.z), axis=2)

    # Discs and ribs touch few columns: edit those (columns, Z) sub-arrays only.
    # A disc takes ~7 mm of each ~31 mm vertebral level, a rib ~11 mm of each ~28 mm.
    disc_slices = (grid.z - a.disc_offset_mm) % a.disc_period_mm < 0.22 * a.disc_period_mm
    columns = volume[vertebral_body]
    columns[:, disc_slices] = HU["disc"]
    volume[vertebral_body] = columns

    ring = _rib_ring(a, x, y)
    # A rib at height z posteriorly is lower by rib_slope * dy further anterior.
    rib_z = grid.z[None, :] + a.rib_slope * (y[ring][:, None] - a.body_centre[1])
    columns = volume[ring]
    columns[(rib_z - a.rib_offset_mm) % a.rib_period_mm < 0.4 * a.rib_period_mm] = HU["rib"]
    volume[ring] = columns
    return volume


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


def _lung_intervals(lung: Lung, descent_mm: float, x, y, footprint: np.ndarray, inhale: np.ndarray) -> Intervals:
    """The lung between its diaphragm dome (below) and its apex cap (above), per phase.

    At inhale fraction f the dome is descent_mm * f lower and the footprint is
    ap_growth_mm * f deeper, so the end-inhale lung contains the lung of every other phase.
    """
    f = inhale[:, None, None]  # (K, 1, 1)
    semi_y = lung.semi_axes[1] + lung.ap_growth_mm * f
    r2 = ((x - lung.centre[0]) / lung.semi_axes[0]) ** 2 + ((y - lung.centre[1]) / semi_y) ** 2
    dome = lung.base_z + lung.dome_mm * (1 - r2) - descent_mm * f
    return _masked(dome, lung.apex_z - lung.cap_mm * r2, (r2 < 1) & footprint)


def _ellipsoid_intervals(solid: Ellipsoid, x, y, footprint: np.ndarray, inhale: np.ndarray) -> Intervals:
    """An ellipsoid moved down by descent_mm * f at inhale fraction f, per phase."""
    rx, ry, rz = solid.semi_axes
    half = rz * np.sqrt(np.clip(1 - _ellipse_r2(x, y, solid.centre[:2], (rx, ry)), 0, None))
    z = solid.centre[2] - solid.descent_mm * inhale[:, None, None]
    return _masked(z - half, z + half, (half > 0) & footprint)


def _moving_terms(anatomy: Anatomy, grid: Grid, inhale: np.ndarray) -> list[tuple[float, Intervals]]:
    """(weight_hu, intervals) terms that paint the breathing structures onto soft tissue.

    Painting lungs, then heart, then lesion (each over the last) is written as a sum of
    interval indicators [.] so that phases can be averaged term by term:

        HU - soft = (lung - soft) ([L] - [L & H]) + (blood - soft) [B] + (lesion - lung) ([S] - [S & H])

    with L either lung, H the heart (soft tissue itself), B its blood pool (inside H) and
    S the lesion clipped to its lung.
    """
    a = anatomy
    x, y = grid.plane()
    cavity = _ellipse_r2(x, y, a.body_centre, a.cavity_semi_axes) < 1
    xs, ys = a.vertebra_centre
    r = a.vertebra_radius_mm
    # The lungs wrap around the vertebral body but not into it or the muscles behind it.
    spine = (_ellipse_r2(x, y, (xs, ys), (r + 6, r + 6)) < 1) | ((np.abs(x - xs) < 0.8 * r + 6) & (y < ys))
    lungs = [_lung_intervals(lung, a.amplitude_mm, x, y, cavity & ~spine, inhale) for lung in a.lungs]
    heart = _ellipsoid_intervals(a.heart, x, y, cavity, inhale)
    blood_pool = Ellipsoid(a.heart.centre, tuple(0.6 * s for s in a.heart.semi_axes), a.heart.descent_mm)
    blood = _ellipsoid_intervals(blood_pool, x, y, cavity, inhale)
    lesion = _ellipsoid_intervals(a.lesion, x, y, cavity, inhale) & lungs[a.lesion_lung]

    lung_hu = HU["lung"] - HU["soft_tissue"]
    lesion_hu = HU["lesion"] - HU["lung"]
    return [
        *[(lung_hu, lung) for lung in lungs],
        *[(-lung_hu, lung & heart) for lung in lungs],
        (HU["blood"] - HU["soft_tissue"], blood),
        (lesion_hu, lesion),
        (-lesion_hu, lesion & heart),
    ]


def _render(terms: list[tuple[float, Intervals]], phases: slice, grid: Grid) -> np.ndarray:
    """(X, Y, Z) float32: each term's weight_hu times the fraction of the selected phases
    in which a voxel lies inside the term's interval, summed over terms.

    Instead of painting one volume per phase, each interval adds +w at its first voxel and
    -w just past its last in a difference array, which one cumulative sum along Z turns
    into the painted volume: one pass over the volume however many phases are averaged.
    """
    nx, ny, nz = grid.shape
    column_start = np.arange(nx * ny, dtype=np.int64).reshape(nx, ny) * nz
    difference = np.zeros(nx * ny * nz, dtype=np.float32)
    for weight_hu, intervals in terms:
        first, stop = _voxel_index(intervals.lo[phases], grid), _voxel_index(intervals.hi[phases], grid)
        weight = np.float32(weight_hu / len(first))
        filled = first < stop
        np.add.at(difference, np.broadcast_to(column_start, filled.shape)[filled] + first[filled], weight)
        ends_inside = filled & (stop < nz)  # an interval that reaches the top needs no end mark
        np.add.at(difference, np.broadcast_to(column_start, filled.shape)[ends_inside] + stop[ends_inside], -weight)
    difference = difference.reshape(nx, ny, nz)
    return np.cumsum(difference, axis=2, out=difference)


def _voxel_index(z_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """Index of the first voxel whose centre is at or above z_mm, clipped to [0, Z]."""
    index = np.ceil((z_mm - grid.z[0]) / grid.spacing_mm[2])
    return np.clip(index, 0, len(grid.z)).astype(np.int64)


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
        rng: source of the anatomy and then of the noise; the same seed gives the same
            patient, and noise_sd_hu=0 gives the same anatomy without noise.
        shape: (X, Y, Z) voxels.
        spacing_mm: (X, Y, Z) voxel size in mm.
        num_phases: phases in the breathing cycle, >= 1.
        noise_sd_hu: Gaussian noise in each phase, HU.

    Returns:
        (average_hu, phase0_hu): canonical RAS+ (X, Y, Z) float32 arrays of integer HU in
        [-1024, 3071].
    """
    grid = Grid.centred(shape, spacing_mm)
    anatomy = sample_anatomy(rng, grid)
    terms = _moving_terms(anatomy, grid, breathing_curve(num_phases))
    average = _static_volume(anatomy, grid)
    phase0 = average + _render(terms, slice(0, 1), grid)
    average += _render(terms, slice(None), grid)
    if noise_sd_hu > 0:
        _add_phase_noise(rng, average, phase0, num_phases, noise_sd_hu)
    for volume in (average, phase0):
        np.rint(volume, out=volume)
        np.clip(volume, *SCANNER_RANGE_HU, out=volume)
    return average, phase0


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
) -> list[PhantomPair]:
    """Write num_train + num_test phantom pairs as trainA/trainB/testA/testB/patient_<i>.nii.gz.

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
        average, phase0 = make_patient(np.random.default_rng(patient_seed), shape, spacing_mm, num_phases)
        path_a = write_volume(output_dir / f"{split}A" / name, average, meta, dtype="int16")
        path_b = write_volume(output_dir / f"{split}B" / name, phase0, meta, dtype="int16")
        diff_hu = float(np.abs(average - phase0)[body_mask(phase0)].mean())
        logger.info("%s/%s: mean |A - B| inside the body %.1f HU", split, name, diff_hu)
        pairs.append(PhantomPair(path_a, path_b, diff_hu))
    return pairs


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
    return parser


def main(opt: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    preset = SIZES[opt.size]
    shape = tuple(opt.shape or preset.shape)
    spacing_mm = tuple(opt.spacing_mm or preset.spacing_mm)
    try:
        pairs = write_dataset(
            opt.output_dir, opt.num_train, opt.num_test, shape, spacing_mm, opt.num_phases, opt.seed, opt.overwrite
        )
    except FileExistsError as error:
        print(f"make_phantom.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    mean_diff_hu = np.mean([pair.mean_abs_diff_body_hu for pair in pairs])
    print(f"Wrote {opt.num_train} train + {opt.num_test} test pairs to {opt.output_dir}/{{trainA,trainB,testA,testB}}")
    print(
        f"grid {' x '.join(map(str, shape))} voxels at {' x '.join(f'{s:.2f}' for s in spacing_mm)} mm, "
        f"{opt.num_phases} breathing phases, seed {opt.seed}"
    )
    print(
        f"mean |A - B| inside the body: {mean_diff_hu:.1f} HU (A = average CT, B = phase 0; mean over n = {len(pairs)})"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
