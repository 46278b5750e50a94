"""Client for the sam-fast TorchServe endpoint.

python inference.py IMAGE [IMAGE...] [--url URL] [--model NAME] [--token TOKEN] [--out DIR]
                    [--format pickle|json]

Each image is POSTed as the raw body. The answer is decoded safely (the pickle with an unpickler
that refuses every global), then written as OUT/<image>.json (COCO-RLE annotations) and
OUT/<image>.overlay.png. Connection errors, 503s and a worker that died (TorchServe answers 507
"Worker died." and restarts it) are retried with backoff; 4xx answers are not. A failed image is reported and the run goes on; the exit status is 1 if any image failed.
"""

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import cv2
import numpy as np
import requests
from pycocotools import mask as mask_utils

from sam_fast_serve.imaging import decode_image
from sam_fast_serve.wire import decode_pickled, is_annotation_list



class RequestFailed(Exception):
    """The server answered an error or could not be reached after the retries."""


def default_token() -> Optional[str]:
    """The inference token: $TS_INFERENCE_TOKEN, else the one in ./key_file.json if present."""
    if os.environ.get("TS_INFERENCE_TOKEN"):
        return os.environ["TS_INFERENCE_TOKEN"]
    try:
        with open("key_file.json") as f:
            return json.load(f)["inference"]["key"]
    except (OSError, ValueError, KeyError):
        return None


def is_transient(reply: requests.Response) -> bool:
    """503 (busy), or TorchServe's 507 "Worker died." (it restarts the worker; our handler's own
    507 out-of-memory answers carry an "error" field and are not retried)."""
    if reply.status_code == 503:
        return True
    if reply.status_code != 507:
        return False
    try:
        return "error" not in reply.json()
    except ValueError:
        return True


def post_image(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict,
    retries: int,
    backoff: float,
    timeout: float,
) -> requests.Response:
    """POST with retries (exponential backoff) on connection errors and transient 5xx; never on 4xx."""
    for attempt in range(retries + 1):
        try:
            reply = session.post(url, data=body, headers=headers, timeout=timeout)
            if not is_transient(reply):
                return reply
            problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
        except requests.ConnectionError as exc:
            problem = f"cannot reach {url} ({exc.__class__.__name__})"
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise RequestFailed(f"{problem} (after {retries + 1} attempts)")


def parse_reply(reply: requests.Response) -> List[dict]:
    """The annotations of a 200 reply (pickle or JSON), or RequestFailed with the server's reason."""
    if reply.status_code != 200:
        try:
            reason = reply.json().get("message", reply.text)
        except ValueError:
            reason = reply.text
        raise RequestFailed(f"HTTP {reply.status_code}: {reason}")
    try:
        if reply.headers.get("Content-Type", "").startswith("application/json"):
            payload: Any = reply.json()
        else:
            payload = decode_pickled(reply.text)
    except (pickle.UnpicklingError, ValueError) as exc:
        raise RequestFailed(f"refused the server's answer: {exc}") from exc
    if not is_annotation_list(payload):
        raise RequestFailed("the server's answer is not a list of annotations")
    return payload


def overlay(image: np.ndarray, annotations: List[dict], alpha: float = 0.5) -> np.ndarray:
    """The RGB image with each mask painted in its own colour, largest first so small ones show."""
    canvas = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for ann in sorted(annotations, key=lambda a: a["area"], reverse=True):
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        canvas[mask] = canvas[mask] * (1 - alpha) + rng.integers(0, 256, 3) * alpha
    return canvas.astype(np.uint8)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="sam-fast")
    parser.add_argument("--token", default=None, help="inference token (default: $TS_INFERENCE_TOKEN or ./key_file.json)")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--format", choices=("pickle", "json"), default="pickle", help="wire format to ask for")
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    url = f"{args.url.rstrip('/')}/predictions/{args.model}"
    headers = {"Content-Type": "application/octet-stream"}
    token = args.token or default_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if args.format == "json":
        headers["Accept"] = "application/json"
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with requests.Session() as session:
        for path in args.images:
            try:
                body = path.read_bytes()
                started = time.perf_counter()
                reply = post_image(session, url, body, headers, args.retries, args.backoff, args.timeout)
                annotations = parse_reply(reply)
                latency = time.perf_counter() - started
            except (OSError, RequestFailed) as exc:
                failures += 1
                print(f"{path}: FAILED: {exc}", file=sys.stderr)
                continue
            (args.out / f"{path.stem}.json").write_text(json.dumps(annotations))
            image = decode_image(body, max_pixels=10**9)
            painted = overlay(image, annotations)
            cv2.imwrite(str(args.out / f"{path.stem}.overlay.png"), cv2.cvtColor(painted, cv2.COLOR_RGB2BGR))
            print(f"{path}: {len(annotations)} masks, {latency:.2f} s, {len(reply.content)} bytes -> {args.out}/{path.stem}.json")
    print(f"{len(args.images) - failures} of {len(args.images)} images segmented")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
