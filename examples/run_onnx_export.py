"""Generate phase 0 from an average CT with an exported ONNX file: onnxruntime, numpy and nibabel only.

    python examples/run_onnx_export.py exports/ct_phase0_demo_latest_G.onnx \
        datasets/ct_phases_dataset/testA/patient_1.nii.gz patient_1_phase0.nii.gz

Every setting comes from the metadata that export_model.py stores in the file; the steps are
those of the project's data/slice_cache.py (SlicePipeline), with torch's resize written in numpy.
"""

import argparse
import json

import nibabel as nib
import numpy as np
import onnxruntime as ort


def resize_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear resize (align_corners=False) along one axis;
    antialiased, the triangle filter is widened by the shrink factor, as torch and PIL do."""
    scale, weights = n_in / n_out, np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        if antialias:
            support = max(scale, 1.0)
            first, stop = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            w = np.maximum(0.0, 1.0 - np.abs((np.arange(first, stop) - centre + 0.5) / support))
            weights[i, first:stop] = w / w.sum()
        else:
            source = max(centre - 0.5, 0.0)
            j = int(source)
            weights[i, j] += 1.0 - (source - j)
            weights[i, min(j + 1, n_in - 1)] += source - j
    return weights


def resize(stack: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W) -> (N, height, width) float32, antialiased when either side shrinks."""
    if stack.shape[1:] == (height, width):
        return stack
    antialias = height < stack.shape[1] or width < stack.shape[2]
    rows, columns = resize_weights(stack.shape[1], height, antialias), resize_weights(stack.shape[2], width, antialias)
    return (rows @ stack @ columns.T).astype(np.float32)


def translate(session: ort.InferenceSession, meta: dict, volume: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Canonical (X, Y, Z) volume in HU -> the generated volume, same shape, float32 HU."""
    slices = np.moveaxis(volume, meta["slice_axis_index"], 0)  # (N, H, W)
    if meta["intensity"] == "hu":
        lo, hi = meta["hu_min"], meta["hu_max"]
    else:  # each volume's own finite min..max
        finite = volume[np.isfinite(volume)]
        lo, hi = float(finite.min()), float(finite.max())
    slices = np.nan_to_num(slices, nan=lo, posinf=hi, neginf=lo)
    pixels = np.clip((slices - lo) * np.float32(255.0 / (hi - lo)), 0, 255)
    inputs = resize(pixels, meta["resize_to"], meta["resize_to"]) / np.float32(127.5) - 1  # (N, S, S) in [-1, 1]

    n, k = len(slices), meta["context_slices"]
    output = np.empty(slices.shape, dtype=np.float32)  # (N, H, W) in HU
    for start in range(0, n, batch_size):
        centres = np.arange(start, min(start + batch_size, n))
        channels = np.clip(centres[:, None] + np.arange(-k, k + 1), 0, n - 1)  # (B, 1+2K): each slice, its neighbours
        fake = session.run([meta["output_name"]], {meta["input_name"]: inputs[channels]})[0][:, meta["output_channel"]]
        fake_pixels = np.clip((resize(fake, *slices.shape[1:]) + 1) * np.float32(127.5), 0, 255)
        output[start : start + len(centres)] = fake_pixels * np.float32((hi - lo) / 255.0) + np.float32(lo)
    return np.moveaxis(output, 0, meta["slice_axis_index"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_file")
    parser.add_argument("input_nifti")
    parser.add_argument("output_nifti")
    parser.add_argument("--output_dtype", choices=("int16", "float32"), default="int16")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    session = ort.InferenceSession(args.onnx_file, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["ct_phase_generator"])
    image = nib.load(args.input_nifti)
    volume = nib.as_closest_canonical(image).get_fdata(dtype=np.float32)  # (X, Y, Z) in HU, RAS+ axes
    generated = translate(session, meta, volume, args.batch_size)

    # Back to the input's storage order, on its grid.
    to_storage = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(image.affine)
    )
    data = nib.orientations.apply_orientation(generated, to_storage)
    if args.output_dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    result = type(image)(data, image.affine, image.header)
    result.header.set_data_dtype(data.dtype)
    result.header.set_slope_inter(1.0, 0.0)
    nib.save(result, args.output_nifti)
    print(args.output_nifti)


if __name__ == "__main__":
    main()
