"""Synthetic studies with known ground truth, for tests, benchmarks and the demo.

INTERFACE STUB — being implemented. Agreed API:

    ct_chest_phantom(rows=128, columns=128, slices=60, pixel_spacing=(0.8, 0.8) mm,
                     slice_spacing=2.5 mm, orientation="axial"|"sagittal"|"coronal"|"oblique" or 6 cosines,
                     reverse_order=False, gantry_tilt_deg=0.0, transfer_syntax=ExplicitVRLittleEndian UID,
                     seed=0, study_uid=None, ...) -> SyntheticSeries
    mr_head_phantom(... same geometry options ...) -> SyntheticSeries

SyntheticSeries:
    datasets: list[pydicom.Dataset] — one per slice, ready to save (file meta included)
    voxels: ndarray (z, y, x) in modality units, z sorted ASCENDING along the slice normal
            n = row_direction x column_direction (the convention dicom_io.volume uses too)
    truth: dict[str, ndarray bool (z, y, x)] — "body", "lung_left", "lung_right", "emphysema",
           "bone", "trachea" for CT; "head", "brain" for MR — same indexing as voxels
    affine: 4x4 LPS affine for that indexing (same convention as dicom_io.types.Volume)
    write(directory) -> list[Path]
"""
