"""The wire format: response bytes and encode time by zlib level, against pickle+base64 alone.

    python -m benchmarks.bench_wire

Payloads: annotations shaped like SAM's for natural masks (SLIC superpixels of the sample photos,
grouped into ~100 masks of varied size, like a real AMG answer), and for the fragmented masks a
random-weight model gives (the keep-all tests' case). Times are the best of 5.
"""

from __future__ import annotations

import argparse
import base64
import pickle
from typing import Any

import numpy as np
import torch
from skimage import data
from skimage.segmentation import slic

from benchmarks.measure import best_seconds
from sam_fast_serve.common.records import rle_to_builtins
from sam_fast_serve.common.wire import decode_pickled, encode_json, encode_pickled
from sam_fast_serve.models.rle import encode_masks


def annotations(masks: torch.Tensor) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    records = []
    for rle, mask in zip(encode_masks(masks), masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        records.append(
            {
                "segmentation": rle_to_builtins(rle),
                "area": int(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())],
                "predicted_iou": float(rng.uniform(0.88, 1.0)),
                "point_coords": [[float(rng.uniform(0, 512)), float(rng.uniform(0, 512))]],
                "stability_score": float(rng.uniform(0.95, 1.0)),
                "crop_box": [0.0, 0.0, float(mask.shape[1]), float(mask.shape[0])],
            }
        )
    return records


def natural_payload(image: np.ndarray, count: int = 100) -> list[dict[str, Any]]:
    labels = torch.as_tensor(slic(image, n_segments=count, start_label=0))
    return annotations(torch.stack([labels == i for i in range(int(labels.max()) + 1)]))


def fragmented_payload(shape=(512, 512), count: int = 48) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(count, 1, shape[0] // 2, shape[1] // 2, generator=generator)
    return annotations(torch.nn.functional.interpolate(low, size=shape, mode="bilinear")[:, 0] > 0)


def pickle_base64(payload: Any) -> str:
    return base64.b64encode(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    payloads = {
        "astronaut, ~100 natural masks": natural_payload(data.astronaut()),
        "chelsea, ~100 natural masks": natural_payload(data.chelsea()),
        "random weights, 48 fragmented masks": fragmented_payload(),
    }
    print("| payload | encoding | bytes | vs pickle+base64 | encode ms | decode ms |")
    print("|---|---|---|---|---|---|")
    for name, payload in payloads.items():
        plain = pickle_base64(payload)
        rows = [("pickle+base64 (no zlib)", lambda: pickle_base64(payload), None)]
        rows += [
            (f"pickle+zlib {level}+base64", lambda level=level: encode_pickled(payload, level), decode_pickled)
            for level in (1, 3, 6, 9)
        ]
        rows += [("JSON", lambda: encode_json(payload), None)]
        for label, encode, decode in rows:
            body = encode()
            decode_ms = best_seconds(lambda: decode(body), 5) * 1e3 if decode else float("nan")
            print(
                f"| {name} | {label} | {len(body):,} | {len(body) / len(plain):.2f} | "
                f"{best_seconds(encode, 5) * 1e3:.1f} | {decode_ms:.1f} |"
            )


if __name__ == "__main__":
    main()
