"""sam-fast-client: segment image files, folders and globs through a running sam-fast TorchServe.

INPUTs are image files, folders (searched recursively for .jpg .jpeg .png .webp .tif .tiff .bmp
.gif in any case; hidden files and the output folder are skipped) and globs (expanded here too, so
a quoted '*.png' works; '**' recurses). Each folder and glob is taken in sorted order.

For each image the answer is decoded safely (a pickle with an unpickler that refuses every global)
and written as OUT/<name>.json, with the masks drawn over the photo in OUT/<name>.overlay.png;
<name> is the image's path relative to the folder argument it came from (its file name for a file
or glob argument), without its suffix. Every file is written to a temporary file and renamed, so
none is ever left half-written. An image whose .json is already there and valid is skipped
(--force sends everything again). --coco writes one COCO instances dataset for the run.

Without prompts the server generates masks automatically. With --point (label 1 = foreground, the
default; 0 = background) and/or --box, it returns the masks of those prompts (one set per box;
points join every box), and the overlay shows the prompts.

Connection errors, 503s and a worker that died (TorchServe answers 507 "Worker died." and restarts
it) are retried with exponential backoff; 4xx answers are not. A failed image is reported (and
written to the failures report) and the run goes on. Exit status: 0 when every image is done, 1
when one failed, 2 for bad arguments, 130 after Ctrl-C (what was done is kept and in the COCO file).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import json
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import requests
from tqdm import tqdm

from sam_fast_serve import __version__
from sam_fast_serve.client.coco import CocoImage, header_size, mask_size, masks_of, write_coco
from sam_fast_serve.client.overlay import overlay_png
from sam_fast_serve.common.endpoint import INFERENCE_URL, MODEL_NAME, default_inference_token
from sam_fast_serve.common.wire import JSON_MEDIA_TYPE, decode_pickled, is_annotation_list, is_prompt_response

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
# The shipped model-config.yaml batches up to 4 requests (maxBatchDelay 50 ms): with 8 in flight a
# full batch is already queued while one runs, so the worker never waits for the client.
DEFAULT_CONCURRENCY = 8
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130  # and argparse's 2 for bad arguments
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
PROGRESS_DISABLE = {"auto": None, "always": False, "never": True}  # tqdm's disable=None: only on a terminal


@dataclass(frozen=True)
class InputImage:
    """An image to segment: its id (1-based, in input order), its file, and its name relative to
    the argument it came from, which names its result files."""

    id: int
    path: Path
    name: PurePosixPath

    def output(self, out: Path, suffix: str) -> Path:
        """OUT/<name with `suffix` for its suffix>."""
        return out.joinpath(*self.name.with_suffix(suffix).parts)

    def result(self, out: Path) -> Path:
        return self.output(out, ".json")

    def overlay(self, out: Path) -> Path:
        return self.output(out, ".overlay.png")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _images_under(folder: Path, skip: Path) -> list[Path]:
    """The image files under `folder`, relative to it, sorted; hidden files and folders and the
    resolved folder `skip` (the output, which holds overlay PNGs) are left out."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [f for f in folders if not f.startswith(".") and (Path(root) / f).resolve() != skip]
        found += [(Path(root) / f).relative_to(folder) for f in files if not f.startswith(".") and _is_image(f)]
    return sorted(found)


def find_images(arguments: Sequence[str], out: Path) -> tuple[list[InputImage], list[str]]:
    """The images `arguments` name, in argument order, each folder and glob sorted, each file once
    per name; and an error message for each folder or glob that holds no image.

    A folder gives its image files (see `_images_under`) named by their path relative to it; a
    glob its image files outside `out`, named by file name; any other argument is one file named
    by its file name, taken even when it is missing: its read fails as that image's failure.
    """
    found: dict[tuple[Path, PurePosixPath], Path] = {}
    errors = []
    skip = out.resolve()
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            matches = [(path / rel, PurePosixPath(rel.as_posix())) for rel in _images_under(path, skip)]
        elif path.exists() or not any(c in argument for c in "*?["):
            matches = [(path, PurePosixPath(path.name))]
        else:
            files = sorted(map(Path, glob.glob(argument, recursive=True)))
            matches = [
                (f, PurePosixPath(f.name))
                for f in files
                if _is_image(f.name) and f.is_file() and not f.resolve().is_relative_to(skip)
            ]
        if not matches:
            errors.append(f"{argument}: no image ({' '.join(IMAGE_SUFFIXES)}) there")
        for file, name in matches:
            found.setdefault((file.resolve(), name), file)
    return [InputImage(i, file, name) for i, ((_, name), file) in enumerate(found.items(), 1)], errors


def clashes(images: Sequence[InputImage], out: Path, reports: Sequence[Path]) -> list[str]:
    """One message for each result file that two images, or an image and one of `reports` (the
    COCO file, the failures report), would both write."""
    by_result: dict[Path, list[str]] = defaultdict(list)
    base = out.resolve()
    for image in images:
        by_result[image.result(base)].append(str(image.path))
        by_result[image.overlay(base)].append(str(image.path))
    for report in reports:
        by_result[report.resolve()].append(f"the report {report}")
    return [f"{path}: {', '.join(writers)}" for path, writers in by_result.items() if len(writers) > 1]


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (parent folders created): what the block writes there
    replaces `path` when the block ends, and is removed if the block raises. So `path` is never
    seen half-written, after Ctrl-C or a crash either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename; hidden and .tmp, so no folder search picks it up.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Prompts:
    """The point and box prompts sent with every image; none: automatic masks."""

    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.points or self.boxes)

    def fields(self) -> dict[str, Any]:
        """The request's prompt fields, those without a value left out."""
        named = {"points": self.points, "labels": self.labels, "boxes": self.boxes}
        return {name: value for name, value in named.items() if value}


def parse_point(text: str) -> tuple[list[float], int]:
    """'X,Y' or 'X,Y:LABEL' -> ([x, y], label); argparse's error for anything else."""
    where, _, label = text.partition(":")
    try:
        x, y = (float(v) for v in where.split(","))
        value = int(label or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is X,Y or X,Y:LABEL, got {text!r}") from None
    if value not in (0, 1):
        raise argparse.ArgumentTypeError(f"a point's label is 1 (foreground) or 0 (background), got {text!r}")
    return [x, y], value


def parse_box(text: str) -> list[float]:
    """'X0,Y0,X1,Y1' -> [x0, y0, x1, y1]; argparse's error for anything else."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"a box is X0,Y0,X1,Y1, got {text!r}")
    return box


def at_least(kind: Callable[[str], float], minimum: float) -> Callable[[str], float]:
    """argparse type: a number of `kind` (int or float) no less than `minimum`."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in "invalid int value"
    return parse


class RequestFailed(Exception):
    """The server did not segment an image: why, and the HTTP status of its error answer (None
    when there was none: unreachable, or an answer the client refused)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def error_message(reply: requests.Response) -> str:
    """The "message" of an error answer's JSON body, else the start of the body."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return reply.text[:200]


def is_transient(reply: requests.Response) -> bool:
    """503 (busy), or TorchServe's 507 "Worker died." (it restarts the worker). Our handler's own
    507 out-of-memory answers carry an "error" field and are not retried."""
    if reply.status_code == 503:
        return True
    if reply.status_code != 507:
        return False
    try:
        body = reply.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "error" in body)


def post(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    retries: int,
    backoff: float,
    timeout: float,
) -> requests.Response:
    """POST `body` and return the first answer that is not transient. Connection errors and
    transient answers are retried `retries` times, waiting backoff, 2*backoff, ... seconds first.
    RequestFailed when they persist, or on another transport error (a read time-out is not
    retried: the server may still be working on that image)."""
    for attempt in range(retries + 1):
        try:
            reply = session.post(url, data=body, headers=headers, timeout=timeout)
        except requests.ConnectionError as exc:
            problem, status = f"cannot reach {url} ({exc.__class__.__name__})", None
        except requests.RequestException as exc:
            raise RequestFailed(f"{exc.__class__.__name__}: {exc}") from exc
        else:
            if not is_transient(reply):
                return reply
            problem, status = error_message(reply), reply.status_code
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise RequestFailed(f"{problem} (after {retries + 1} attempts)", status)


@dataclass(frozen=True)
class Outcome:
    """What became of one image, with its line for the console. `reason` is set when it failed
    (with `status`, see RequestFailed); otherwise `size` is its (width, height) when a COCO file
    is wanted, and `skipped` says an earlier run did it."""

    image: InputImage
    line: str = ""
    skipped: bool = False
    size: tuple[int, int] | None = None
    status: int | None = None
    reason: str | None = None

    @classmethod
    def failure(cls, image: InputImage, reason: str, status: int | None = None) -> Outcome:
        shown = f"HTTP {status}: {reason}" if status is not None else reason
        return cls(image, f"{image.path}: FAILED: {shown}", status=status, reason=reason)


# The files an image's outcome comes with, written in this order: the .json last, because a
# valid .json is what marks an image done for the next run.
Files = list[tuple[Path, bytes]]


@dataclass(frozen=True)
class Segmenter:
    """What happens to one image in this run: where it is sent, what is asked, what is written."""

    url: str
    headers: dict[str, str]
    prompts: Prompts
    out: Path
    retries: int
    backoff: float
    timeout: float
    overlay: bool
    resume: bool
    coco: bool

    def _expected(self, payload: Any) -> bool:
        return is_prompt_response(payload) if self.prompts else is_annotation_list(payload)

    def _coco_size(self, masks_size: tuple[int, int] | None, image: InputImage) -> tuple[int, int] | None:
        """(width, height) for the COCO file, None without one: that of the masks, else (no mask)
        the image header's; OSError when PIL cannot read that header."""
        if not self.coco:
            return None
        return masks_size or header_size(image.path)

    def _overlay(self, data: bytes, payload: Any) -> bytes:
        return overlay_png(data, masks_of(payload), self.prompts.points, self.prompts.labels, self.prompts.boxes)

    def _previous(self, image: InputImage) -> tuple[Outcome, Files]:
        """The outcome of an image an earlier run did, with its overlay if that is wanted and
        missing (drawn here, nothing is sent). OSError or ValueError when there is no valid result."""
        with open(image.result(self.out), "rb") as f:
            payload = json.load(f)
        if not self._expected(payload):
            raise ValueError("the result is not an answer to this kind of request")
        size = self._coco_size(mask_size(payload), image)
        files = []
        if self.overlay and not image.overlay(self.out).exists():
            files.append((image.overlay(self.out), self._overlay(image.path.read_bytes(), payload)))
        return Outcome(image, skipped=True, size=size), files

    def _payload(self, reply: requests.Response) -> tuple[Any, tuple[int, int] | None]:
        """The decoded payload of a 200 answer of the expected kind with well-formed masks, and
        the (width, height) of its masks (None without a mask); RequestFailed otherwise."""
        if reply.status_code != 200:
            raise RequestFailed(error_message(reply), reply.status_code)
        try:
            if reply.headers.get("Content-Type", "").startswith(JSON_MEDIA_TYPE):
                payload = reply.json()
            else:
                payload = decode_pickled(reply.content)
        except Exception as exc:  # an unpickler raises many types on malformed input
            raise RequestFailed(f"refused the server's answer: {exc}") from exc
        if not self._expected(payload):
            kind = "masks for prompts" if self.prompts else "a list of annotations"
            raise RequestFailed(f"the server's answer is not {kind}")
        try:
            return payload, mask_size(payload)
        except ValueError as exc:
            raise RequestFailed(f"the server's answer has a malformed mask: {exc}") from exc

    def segment(self, session: requests.Session, image: InputImage) -> tuple[Outcome, Files]:
        """Segment one image (or find it done by an earlier run): its outcome and the files to
        write. The answer is dropped on return, so memory does not grow with the run."""
        if self.resume:
            try:
                return self._previous(image)
            except (OSError, ValueError):
                pass  # no valid result yet: segment it
        try:
            data = image.path.read_bytes()
        except OSError as exc:
            return Outcome.failure(image, f"cannot read the image: {exc.strerror or exc}"), []
        if self.prompts:
            body = json.dumps({"image": base64.b64encode(data).decode("ascii"), **self.prompts.fields()}).encode()
        else:
            body = data
        started = time.perf_counter()
        try:
            reply = post(session, self.url, body, self.headers, self.retries, self.backoff, self.timeout)
            payload, size = self._payload(reply)
        except RequestFailed as exc:
            return Outcome.failure(image, exc.reason, exc.status), []
        latency = time.perf_counter() - started
        files = []
        try:
            size = self._coco_size(size, image)
            if self.overlay:
                files.append((image.overlay(self.out), self._overlay(data, payload)))
        except (OSError, ValueError) as exc:
            return Outcome.failure(image, f"segmented, but the image cannot be drawn or measured: {exc}"), []
        files.append((image.result(self.out), json.dumps(payload).encode()))
        line = (
            f"{image.path}: {len(masks_of(payload))} masks, {latency:.2f} s, {len(reply.content)} bytes"
            f" -> {image.result(self.out)}"
        )
        return Outcome(image, line, size=size), files


def write_files(outcome: Outcome, files: Files) -> Outcome:
    """Write `files` in order, each atomically; the outcome, or a failure if one cannot be written."""
    try:
        for path, data in files:
            with replacing(path) as temp:
                temp.write_bytes(data)
    except OSError as exc:
        return Outcome.failure(outcome.image, f"cannot write the result: {exc}")
    return outcome


class Workers:
    """`concurrency` threads, each with its own requests.Session, segmenting the images `run`
    hands them.

    Daemon threads rather than a ThreadPoolExecutor (whose threads are joined at exit), so that
    after Ctrl-C the client exits without waiting for the requests in flight. Files are written
    holding `_writing` and only while `stop` is clear, so once `run` returns after `interrupt`
    no file is being written and none will be.
    """

    def __init__(self, segmenter: Segmenter, concurrency: int) -> None:
        self.segmenter = segmenter
        self.stop = threading.Event()
        self.jobs: queue.SimpleQueue[InputImage | None] = queue.SimpleQueue()
        # Outcomes, a worker's unexpected exception, or None: `interrupt` waking the main thread.
        self.results: queue.SimpleQueue[Outcome | BaseException | None] = queue.SimpleQueue()
        self._writing = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(concurrency)]
        for thread in self.threads:
            thread.start()

    def interrupt(self) -> None:
        """Stop handing out images and writing files. Safe in a signal handler: SimpleQueue.put
        is reentrant, and nothing else takes the Event's lock."""
        self.stop.set()
        self.results.put(None)

    def _work(self) -> None:
        with requests.Session() as session:
            while (image := self.jobs.get()) is not None and not self.stop.is_set():
                try:
                    outcome, files = self.segmenter.segment(session, image)
                    with self._writing:
                        if self.stop.is_set():
                            return  # interrupted: the answer is dropped, nothing written
                        self.results.put(write_files(outcome, files))
                except BaseException as exc:
                    self.results.put(exc)
                    return

    def run(self, images: Sequence[InputImage], handle: Callable[[Outcome], None]) -> int:
        """Segment `images`, calling `handle` in this thread with each outcome as it comes, until
        all are handled or `interrupt` is called. At most two images per thread are out at a time
        (one being segmented, one waiting), so memory does not grow with the number of images.
        Returns how many were handled."""
        window = 2 * len(self.threads)
        submitted = handled = 0
        try:
            while handled < len(images) and not self.stop.is_set():
                while submitted < len(images) and submitted - handled < window:
                    self.jobs.put(images[submitted])
                    submitted += 1
                item = self.results.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    handle(item)
                    handled += 1
            if self.stop.is_set():
                with self._writing:
                    pass  # wait for a write under way to end: none can start now
                while not self.results.empty():
                    item = self.results.get()
                    if isinstance(item, Outcome):
                        handle(item)
                        handled += 1
        finally:
            for _ in self.threads:
                self.jobs.put(None)
        return handled


class Tally:
    """The main thread's side of a run: console lines, the progress bar, the failures report (one
    JSON line per failed image, flushed), and the images done, for the COCO file."""

    def __init__(self, bar: tqdm, report: TextIO, out: Path) -> None:
        self.bar = bar
        self.report = report
        self.out = out
        self.segmented = self.skipped = self.failed = 0
        self.done: list[CocoImage] = []

    def __call__(self, outcome: Outcome) -> None:
        if outcome.reason is not None:
            self.failed += 1
            record = {"file": str(outcome.image.path), "status": outcome.status, "reason": outcome.reason}
            self.report.write(json.dumps(record) + "\n")
            self.report.flush()
        elif outcome.skipped:
            self.skipped += 1
        else:
            self.segmented += 1
        if outcome.size is not None:
            image = outcome.image
            self.done.append(CocoImage(image.id, str(image.name), *outcome.size, image.result(self.out)))
        # The bar before the line: tqdm.write draws the bar again below the line, with these counts.
        self.bar.set_postfix(failed=self.failed, skipped=self.skipped, refresh=False)
        self.bar.update()
        if outcome.line:
            stream = sys.stdout if outcome.reason is None else sys.stderr
            tqdm.write(outcome.line, file=stream)
            stream.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-fast-client",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob")
    parser.add_argument(
        "--url", default=INFERENCE_URL, metavar="URL", help=f"TorchServe inference address (default {INFERENCE_URL})"
    )
    parser.add_argument("--model", default=MODEL_NAME, metavar="NAME", help=f"model name (default {MODEL_NAME})")
    parser.add_argument(
        "--token",
        default=None,
        help="inference token, written --token=VALUE (tokens may begin with '-'; default: $TS_INFERENCE_TOKEN, else ./key_file.json)",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", default=Path("out"), help="output folder (default out)")
    parser.add_argument("--format", choices=("pickle", "json"), default="pickle", help="wire format to ask for")
    parser.add_argument(
        "--concurrency",
        type=at_least(int, 1),
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight (default {DEFAULT_CONCURRENCY}: the shipped TorchServe config batches up to 4 "
        "requests with maxBatchDelay 50 ms, and 8 in flight keep a full batch queued while one runs)",
    )
    parser.add_argument("--no-overlay", action="store_true", help="write no OUT/<name>.overlay.png")
    parser.add_argument("--coco", type=Path, metavar="FILE", help="write one COCO instances dataset for the run")
    parser.add_argument(
        "--failures", type=Path, metavar="FILE", help="JSON lines report of failed images (default OUT/failures.jsonl)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="send every image, even those with a valid result from an earlier run (use it when the prompts changed)",
    )
    parser.add_argument(
        "--progress",
        choices=tuple(PROGRESS_DISABLE),
        default="auto",
        help="progress bar on stderr (default auto: when stderr is a terminal)",
    )
    parser.add_argument(
        "--retries",
        type=at_least(int, 0),
        metavar="N",
        default=4,
        help="retries of connection errors and 503s (default 4)",
    )
    parser.add_argument(
        "--backoff",
        type=at_least(float, 0),
        metavar="S",
        default=1.0,
        help="first retry delay in seconds, doubling (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=at_least(float, 0.001),
        metavar="S",
        default=600.0,
        help="seconds to wait for an answer (default 600)",
    )
    parser.add_argument(
        "--point",
        type=parse_point,
        action="append",
        default=[],
        metavar="X,Y[:LABEL]",
        help="point prompt in image pixels; LABEL 1 foreground (default), 0 background (repeatable)",
    )
    parser.add_argument(
        "--box",
        type=parse_box,
        action="append",
        default=[],
        metavar="X0,Y0,X1,Y1",
        help="box prompt in image pixels (repeatable)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the client on `argv` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(parser, args)
    except KeyboardInterrupt:
        # Only a second Ctrl-C (or one before the run starts) gets here: the first ends the run cleanly.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def segmenter_for(args: argparse.Namespace) -> Segmenter:
    """The Segmenter of the run the command line `args` asks for."""
    prompts = Prompts(
        points=[p for p, _ in args.point], labels=[label for _, label in args.point], boxes=list(args.box)
    )
    headers = {"Content-Type": JSON_MEDIA_TYPE if prompts else "application/octet-stream"}
    token = args.token or default_inference_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if args.format == "json":
        headers["Accept"] = JSON_MEDIA_TYPE
    return Segmenter(
        url=f"{args.url.rstrip('/')}/predictions/{args.model}",
        headers=headers,
        prompts=prompts,
        out=args.out,
        retries=args.retries,
        backoff=args.backoff,
        timeout=args.timeout,
        overlay=not args.no_overlay,
        resume=not args.force,
        coco=args.coco is not None,
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The run `args` asks for (see the module's docstring); returns the exit status."""
    images, errors = find_images(args.inputs, args.out)
    for error in errors:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
    if not images:
        parser.error("no images to segment")
    failures = args.failures or args.out / "failures.jsonl"
    clashing = clashes(images, args.out, [failures, *([args.coco] if args.coco else [])])
    if clashing:
        parser.error("refusing to write one file twice:\n  " + "\n  ".join(clashing))

    failures.parent.mkdir(parents=True, exist_ok=True)
    workers = Workers(segmenter_for(args), args.concurrency)

    def on_sigint(signum: int, frame: Any) -> None:
        workers.interrupt()
        # A second Ctrl-C interrupts the clean-up too.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    bar = tqdm(
        total=len(images), unit="img", file=sys.stderr, disable=PROGRESS_DISABLE[args.progress], bar_format=BAR_FORMAT
    )
    with open(failures, "w") as report, bar:
        tally = Tally(bar, report, args.out)
        bar.set_postfix(failed=0, skipped=0)
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            handled = workers.run(images, tally)
        finally:
            signal.signal(signal.SIGINT, previous)

    interrupted = workers.stop.is_set()
    if interrupted:
        print(
            f"interrupted: {len(images) - handled} images not done; run the same command again to resume",
            file=sys.stderr,
        )
    summary = [f"{tally.segmented + tally.skipped} of {len(images)} images segmented"]
    if tally.skipped:
        summary.append(f"{tally.skipped} skipped (already done)")
    if tally.failed:
        summary.append(f"{tally.failed} failed (see {failures})")
    print(", ".join(summary))
    if args.coco:
        try:
            with replacing(args.coco) as temp, open(temp, "w") as stream:
                annotations = write_coco(stream, sorted(tally.done, key=lambda image: image.id))
        except (OSError, ValueError) as exc:
            print(f"{parser.prog}: error: the COCO file was not written: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"COCO: {len(tally.done)} images, {annotations} annotations -> {args.coco}")
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if tally.failed else EXIT_OK
