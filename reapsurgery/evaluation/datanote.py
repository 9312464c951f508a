"""Whether the evaluation data is the calibration data: masks chosen on a set score well on it, so
their measurement there flatters them. No torch."""

from __future__ import annotations


def calibration_overlap(calibration: dict, data: dict, saliency_name: str) -> str | None:
    """A note when `data` (evaluate's provenance) is the data the saliency was calibrated on: the very
    samples (same sha256 of the token ids), or the same dataset with another selection of rows."""
    same_samples = calibration.get("samples_sha256") is not None and \
        calibration.get("samples_sha256") == data.get("samples_sha256")
    if same_samples or (calibration.get("samples_sha256") is None
                        and all(calibration.get(k) == data.get(k) for k in ("dataset", "seed", "max_length"))):
        return (f"evaluated on the data {saliency_name} was calibrated on ({data.get('dataset')}, the same samples): "
                "masks chosen on these samples score better here than on unseen text; evaluate on held-out data")
    if calibration.get("dataset") is not None and _source(calibration["dataset"]) == _source(data.get("dataset")):
        return (f"evaluated on the dataset {saliency_name} was calibrated on ({data.get('dataset')}), with another "
                "choice of rows (--seed, --num-samples or --max-length differ): the samples may overlap and flatter "
                "the masks; evaluate on held-out data")
    return None


def _source(description: str | None) -> str | None:
    """The dataset a description names, without calibration.data's "[only N samples, M requested]"."""
    return description.split(" [only ", 1)[0] if isinstance(description, str) else None
