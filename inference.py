"""Client for the sam-fast TorchServe endpoint.

python inference.py IMAGE [IMAGE...] [--url URL] [--model NAME] [--token TOKEN] [--out DIR]
                    [--format pickle|json] [--point X,Y[:LABEL] ...] [--box X0,Y0,X1,Y1 ...]

Without prompts the server generates masks automatically. With --point (label 1 = foreground,
the default; 0 = background) and/or --box, it returns the masks of those prompts (one set per
box; points join every box), and the overlay shows the prompts.

Each image is POSTed as the raw body. The answer is decoded safely (the pickle with an unpickler
that refuses every global), then written as OUT/<image>.json (COCO-RLE annotations) and
OUT/<image>.overlay.png. Connection errors, 503s and a worker that died (TorchServe answers 507
"Worker died." and restarts it) are retried with backoff; 4xx answers are not. A failed image is reported and the run goes on; the exit status is 1 if any image failed.
"""

import argparse
import base64
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import requests
from pycocotools import mask as mask_utils

from sam_fast_serve.imaging import decode_image
from sam_fast_serve.wire import decode_pickled, is_annotation_list, is_prompt_response


class RequestFailed(Exception):
    """The server answered an error or could not be reached after the retries."""


def default_token() -> str | None:
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


def parse_point(text: str) -> tuple[list[float], int]:
    """'X,Y' or 'X,Y:LABEL' -> ([x, y], label)."""
    where, _, label = text.partition(":")
    x, y = (float(v) for v in where.split(","))
    return [x, y], int(label or 1)


def parse_box(text: str) -> list[float]:
    """'X0,Y0,X1,Y1' -> [x0, y0, x1, y1]."""
    box = [float(v) for v in text.split(",")]
    if len(box) != 4:
        raise ValueError(f"a box is X0,Y0,X1,Y1, got {text!r}")
    return box


def parse_reply(reply: requests.Response) -> Any:
    """The payload of a 200 reply (pickle or JSON): a list of annotations, or for a prompted
    request {"image_id", "prompts": [{"masks": [...]}, ...]}. RequestFailed otherwise."""
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
    if not (is_annotation_list(payload) or is_prompt_response(payload)):
        raise RequestFailed("the server's answer is neither annotations nor prompt masks")
    return payload


def masks_of(payload: Any) -> list[dict]:
    """Every mask record of a payload, automatic or prompted."""
    if isinstance(payload, dict):
        return [mask for prompt in payload["prompts"] for mask in prompt["masks"]]
    return payload


def overlay(image: np.ndarray, annotations: list[dict], prompts: dict, alpha: float = 0.5) -> np.ndarray:
    """The RGB image with each mask painted in its own colour (largest first so small ones show),
    foreground points green, background points red, boxes yellow."""
    canvas = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for ann in sorted(annotations, key=lambda a: a["area"], reverse=True):
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        canvas[mask] = canvas[mask] * (1 - alpha) + rng.integers(0, 256, 3) * alpha
    painted = np.ascontiguousarray(canvas.astype(np.uint8))
    for (x, y), label in zip(prompts.get("points", []), prompts.get("labels", [])):
        cv2.circle(painted, (round(x), round(y)), 6, (0, 255, 0) if label else (255, 0, 0), -1)
    for x0, y0, x1, y1 in prompts.get("boxes", []):
        cv2.rectangle(painted, (round(x0), round(y0)), (round(x1), round(y1)), (255, 255, 0), 2)
    return painted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="sam-fast")
    parser.add_argument(
        "--token", default=None, help="inference token (default: $TS_INFERENCE_TOKEN or ./key_file.json)"
    )
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--format", choices=("pickle", "json"), default="pickle", help="wire format to ask for")
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--point", action="append", default=[], help="X,Y[:LABEL] in image pixels (repeatable)")
    parser.add_argument("--box", action="append", default=[], help="X0,Y0,X1,Y1 in image pixels (repeatable)")
    args = parser.parse_args(argv)
    try:
        points = [parse_point(p) for p in args.point]
        prompts = {"boxes": [parse_box(b) for b in args.box]} if args.box else {}
    except ValueError as exc:
        parser.error(f"bad --point or --box: {exc}")
    if points:
        prompts.update(points=[p for p, _ in points], labels=[label for _, label in points])

    url = f"{args.url.rstrip('/')}/predictions/{args.model}"
    headers = {"Content-Type": "application/json" if prompts else "application/octet-stream"}
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
                request = (
                    json.dumps({"image": base64.b64encode(body).decode(), **prompts}).encode() if prompts else body
                )
                started = time.perf_counter()
                reply = post_image(session, url, request, headers, args.retries, args.backoff, args.timeout)
                payload = parse_reply(reply)
                latency = time.perf_counter() - started
            except (OSError, RequestFailed) as exc:
                failures += 1
                print(f"{path}: FAILED: {exc}", file=sys.stderr)
                continue
            (args.out / f"{path.stem}.json").write_text(json.dumps(payload))
            masks = masks_of(payload)
            painted = overlay(decode_image(body, max_pixels=10**9), masks, prompts)
            cv2.imwrite(str(args.out / f"{path.stem}.overlay.png"), cv2.cvtColor(painted, cv2.COLOR_RGB2BGR))
            print(
                f"{path}: {len(masks)} masks, {latency:.2f} s, {len(reply.content)} bytes -> {args.out}/{path.stem}.json"
            )
    print(f"{len(args.images) - failures} of {len(args.images)} images segmented")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
