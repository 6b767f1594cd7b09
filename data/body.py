"""The body of a CT volume: the voxels that belong to the patient, lungs included.

One definition for every score taken "in the body": test.py's metrics (evaluation/metrics.py)
and inference's consistency check of a whole generated cycle (the average of the generated
phases against the input average, inference/volume.py).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0


def body_mask(target_hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """(X, Y, Z) bool: the body of a canonical CT volume, lungs included.

    Voxels above ``threshold_hu``, reduced to their largest 3D connected component (face
    connectivity), with holes filled in each axial slice (``[:, :, k]``) separately. A volume
    with no voxel above the threshold gives an all-False mask.
    """
    tissue = np.asarray(target_hu) > threshold_hu
    labels, n_components = ndimage.label(tissue)
    if n_components == 0:
        return tissue
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    largest = labels == sizes.argmax()
    # A 2D cross in the plane of axis 2: holes are filled within each axial slice only.
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(largest, structure=in_plane)
