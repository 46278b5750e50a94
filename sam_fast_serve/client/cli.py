"""sam-fast-client: segment image files, folders and globs through a running sam-fast TorchServe.

INPUTs are image files, folders (searched recursively for .jpg .jpeg .png .webp .tif .tiff .bmp
.gif in any case; hidden files and the output folder are skipped) and globs (expanded here too, so
a quoted '*.png' works; '**' recurses). Each folder and glob is taken in sorted order. Instead of
INPUTs, --prompts FILE.jsonl names one image a line with its own prompts.

For each image the answer is decoded safely (a pickle with an unpickler that refuses every global)
and written as OUT/NAME.json, with the masks drawn over the photo in OUT/NAME.overlay.png and,
with --labels, a uint16 instance label image OUT/NAME.labels.png or .labels.tif; NAME is the
image's path relative to the folder argument it came from (its file name for a file or glob
argument), without its suffix. No file is ever left half-written. An image whose .json is already
there and valid is skipped (--force sends everything again). --coco writes one COCO instances
dataset for the run.

Without prompts the server generates masks automatically, with the options given (the server's
settings for the others). With --point (label 1 = foreground, the default; 0 = background) and/or
--box, or a prompt file, it returns the masks of those prompts (one set per box; points join every
box), and the overlay shows the prompts.

With --text PHRASE (each a concept) and/or --exemplar-box (examples of the concept; alone, the
concept "visual"), every image is a concept request instead (a SAM 3 server): the masks of every
instance of each concept, written as for automatic masks, each record naming its `concept`; the
COCO file's categories are the concepts, in the order given.

A video file (.mp4 .mov .webm .mkv .avi), or any INPUT with --frame (a multi-page TIFF, a page a
frame), is tracked instead (a SAM 2 / 2.1 server): the objects that --point/--box mark on --frame
(one object, --object), or a --prompts FILE.json in the server's form, followed through the frames,
with a progress bar over them; written as OUT/NAME.masklets.json (a record a frame) and
OUT/NAME.labels.tif (a uint16 label stack, a page a frame, the object ids as labels).

Connection errors, 503s and a worker that died are retried with exponential backoff; other
answers are not. An image that cannot be read, sent, drawn or measured is one failure (a line in
the failures report) and the run goes on. A refused token stops the run at the first refusal.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam_fast_serve import __version__
from sam_fast_serve.client.batch import Pipeline, Tally, Workers
from sam_fast_serve.client.fields import checked_concepts, checked_options, checked_prompts, concept_names
from sam_fast_serve.client.http import BACKOFF, RETRIES, TIMEOUT, URL_ENV, WIRES, NotAuthorized, SamClient, SamError
from sam_fast_serve.client.inputs import InputImage, Prompts, clashes, find_images, read_prompt_file
from sam_fast_serve.client.results import Results, write_coco_file
from sam_fast_serve.client.video import (
    LABELS,
    MASKLETS,
    OPENCV_NEEDED,
    is_video,
    label_problem,
    read_prompts,
    track_file,
)
from sam_fast_serve.common.concepts import EXEMPLAR_CONCEPT, MASK_THRESHOLD, THRESHOLD
from sam_fast_serve.common.endpoint import INFERENCE_URL, KEY_FILE, MODEL_NAME, TOKEN_ENV
from sam_fast_serve.common.labels import LABEL_FORMATS
from sam_fast_serve.common.options import AMG_RULES, AMG_SETTINGS, IMAGE_RULES, ImageSettings, fields_of
from sam_fast_serve.common.tracks import DEFAULT_DIRECTION, DIRECTIONS

PROG = "sam-fast-client"
# The shipped model-config.yaml batches up to 4 requests (maxBatchDelay 50 ms): with 8 in flight a
# full batch is already queued while one runs, so the worker never waits for the client.
DEFAULT_CONCURRENCY = 8
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_AUTHORIZED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {
    EXIT_OK: "every image done (segmented now or by an earlier run)",
    EXIT_FAILED: "some images failed (see the failures report), or the COCO file could not be written",
    EXIT_USAGE: "bad arguments or a bad prompt file: nothing was sent",  # argparse's own status
    EXIT_NOT_AUTHORIZED: "the server refused the token: the run stopped at the first refusal",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): what was done is kept, and in the COCO file",
}
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
PROGRESS_DISABLE = {"auto": None, "always": False, "never": True}  # tqdm's disable=None: only on a terminal
# The metavar of a server option by its type; a type without one has no command-line form yet.
_METAVARS: dict[Any, str] = {int: "N", float: "X", str: "VALUE", tuple[int, ...] | None: "C[,C,C]"}


def with_default(text: str, default: object) -> str:
    """A help line: what the option does, then its default (every option's help ends so)."""
    return f"{text} (default: {default})"


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


def parse_exemplar_box(text: str) -> tuple[list[float], int]:
    """'X0,Y0,X1,Y1' or 'X0,Y0,X1,Y1:LABEL' -> ([x0, y0, x1, y1], label); argparse's error for
    anything else."""
    where, _, label = text.partition(":")
    try:
        box, value = parse_box(where), int(label or 1)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"an exemplar box is X0,Y0,X1,Y1 or X0,Y0,X1,Y1:LABEL, got {text!r}") from None
    if value not in (0, 1):
        raise argparse.ArgumentTypeError(
            f"an exemplar box's label is 1 (an example of the concept) or 0 (not one), got {text!r}"
        )
    return box, value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1 (a threshold)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def at_least(kind: Callable[[str], float], minimum: float) -> Callable[[str], float]:
    """argparse type: a number of `kind` (int or float) no less than `minimum`."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in "invalid int value"
    return parse


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _server_value(kind: Any, check: Callable[[Any], str | None]) -> Callable[[str], Any]:
    """argparse type of a server option: the text read as `kind`, then the server's check."""
    read: Callable[[str], Any] = kind if kind in (int, float, str) else _int_list

    def parse(text: str) -> Any:
        value = read(text)
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = getattr(kind, "__name__", "list of integers")
    return parse


def add_server_options(parser: argparse.ArgumentParser, settings: tuple[type, ...], title: str) -> None:
    """One option per field of the dataclasses `settings` (every family's AMG settings, ImageSettings):
    named after the server's key (--points-per-side), with its check, help and default from the field."""
    group = parser.add_argument_group(title)
    hints = {name: hint for cls in settings for name, hint in typing.get_type_hints(cls).items()}
    for option in fields_of(*settings):
        flag = "--" + option.name.replace("_", "-")
        default = option.default if option.default is not None else "none"
        help_text = with_default(
            option.metadata["help"], f"the server's setting, {default} unless its config says otherwise"
        )
        if hints[option.name] is bool:
            group.add_argument(flag, dest=option.name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        if hints[option.name] not in _METAVARS:
            raise TypeError(f"{option.name}: no command-line form for {hints[option.name]}")
        group.add_argument(
            flag,
            dest=option.name,
            type=_server_value(hints[option.name], option.metadata["check"]),
            metavar=_METAVARS[hints[option.name]],
            help=help_text,
        )


def add_concept_options(parser: argparse.ArgumentParser) -> None:
    """The options of concept requests (common.concepts), sent with every image when given."""
    concepts = parser.add_argument_group("concepts (a SAM 3 server: every instance, instead of automatic masks)")
    concepts.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="PHRASE",
        help=with_default("find every instance of PHRASE in every image (repeatable: one concept each)", "none"),
    )
    concepts.add_argument(
        "--exemplar-box",
        type=parse_exemplar_box,
        action="append",
        default=[],
        metavar="X0,Y0,X1,Y1[:LABEL]",
        help=with_default(
            "an example of the concept in image pixels, for every image (LABEL 1, or 0: not one; repeatable); "
            f"it joins every --text, and without --text the boxes are the concept '{EXEMPLAR_CONCEPT}'",
            "none",
        ),
    )
    concepts.add_argument(
        "--threshold",
        type=fraction,
        metavar="X",
        help=with_default("keep the instances whose score is above this", f"the server's, {THRESHOLD}"),
    )
    concepts.add_argument(
        "--mask-threshold",
        type=fraction,
        metavar="X",
        help=with_default("a pixel is in a mask when its probability is above this", f"the server's, {MASK_THRESHOLD}"),
    )
    concepts.add_argument(
        "--max-instances",
        type=at_least(int, 1),
        metavar="N",
        help=with_default("keep the N best instances of each concept", "every instance"),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option's help ends with its default."""
    assert __doc__ is not None
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n", 1)[1],
        epilog="exit status:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image file, folder or glob")
    parser.add_argument(
        "--url",
        metavar="URL",
        help=with_default("TorchServe inference address", f"${URL_ENV}, else {INFERENCE_URL}"),
    )
    parser.add_argument("--model", default=MODEL_NAME, metavar="NAME", help=with_default("model name", MODEL_NAME))
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help=with_default(
            "inference token, written --token=VALUE (a TorchServe token may begin with '-')",
            f"${TOKEN_ENV}, else the inference key of the key file recorded for the server (make serve records it), "
            f"else that of ./{KEY_FILE}",
        ),
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", default=Path("out"), help=with_default("output folder", "out")
    )
    parser.add_argument(
        "--wire",
        "--format",
        choices=WIRES,
        default=WIRES[0],
        help=with_default("wire format of the answers (results on disk are JSON either way)", WIRES[0]),
    )
    parser.add_argument(
        "--concurrency",
        type=at_least(int, 1),
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=with_default(
            "requests in flight (the shipped TorchServe config batches up to 4 requests with maxBatchDelay 50 ms, "
            "and 8 in flight keep a full batch queued while one runs)",
            DEFAULT_CONCURRENCY,
        ),
    )
    parser.add_argument(
        "--no-overlay", action="store_true", help=with_default("write no OUT/NAME.overlay.png", "overlays written")
    )
    parser.add_argument(
        "--overlay-banner",
        metavar="TEXT",
        help=with_default("draw TEXT on a band across the top of every overlay (make smoke marks its own)", "none"),
    )
    parser.add_argument(
        "--labels",
        choices=tuple(LABEL_FORMATS),
        help=with_default(
            "write a uint16 instance label image the size of the input, OUT/NAME"
            + " or ".join(LABEL_FORMATS.values())
            + " (0 background, mask i is i + 1)",
            "none",
        ),
    )
    parser.add_argument(
        "--coco", type=Path, metavar="FILE", help=with_default("write one COCO instances dataset for the run", "none")
    )
    parser.add_argument(
        "--failures",
        type=Path,
        metavar="FILE",
        help=with_default("JSON lines report of the failed images", "OUT/failures.jsonl"),
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=with_default("send every image, even those with a valid result from an earlier run", "resume"),
    )
    parser.add_argument(
        "--progress",
        choices=tuple(PROGRESS_DISABLE),
        default="auto",
        help=with_default("progress bar on stderr", "auto: when stderr is a terminal"),
    )
    parser.add_argument(
        "--retries",
        type=at_least(int, 0),
        metavar="N",
        default=RETRIES,
        help=with_default("retries of connection errors, 503s and a worker that died", RETRIES),
    )
    parser.add_argument(
        "--backoff",
        type=at_least(float, 0),
        metavar="S",
        default=BACKOFF,
        help=with_default("first retry delay in seconds, doubling", BACKOFF),
    )
    parser.add_argument(
        "--timeout",
        type=at_least(float, 0.001),
        metavar="S",
        default=TIMEOUT,
        help=with_default("seconds to wait for an answer", TIMEOUT),
    )
    prompts = parser.add_argument_group("prompts (instead of automatic masks)")
    prompts.add_argument(
        "--point",
        type=parse_point,
        action="append",
        default=[],
        metavar="X,Y[:LABEL]",
        help=with_default("point prompt in image pixels, for every image; LABEL 1 foreground, 0 background", "none"),
    )
    prompts.add_argument(
        "--box",
        type=parse_box,
        action="append",
        default=[],
        metavar="X0,Y0,X1,Y1",
        help=with_default("box prompt in image pixels, for every image (repeatable: one prompt each)", "none"),
    )
    prompts.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE.jsonl",
        help=with_default(
            'one JSON line per image instead of INPUTs: {"file": PATH, "points": [[x, y]], "labels": [1], '
            '"boxes": [[x0, y0, x1, y1]]}, PATH relative to the file\'s folder; with videos, a JSON list of '
            'their prompts: [{"frame": 0, "object": 1, "points": [[x, y]]}, ...]',
            "none",
        ),
    )
    add_concept_options(parser)
    video = parser.add_argument_group("videos and time-lapse stacks (a SAM 2 / 2.1 server)")
    video.add_argument(
        "--frame",
        type=at_least(int, 0),
        metavar="N",
        help=with_default("the frame --point/--box mark (and: track every INPUT, TIFFs as stacks)", "0 for videos"),
    )
    video.add_argument(
        "--object",
        type=at_least(int, 1),
        default=1,
        metavar="ID",
        help=with_default("the id of the object --point/--box mark (its label in the stack)", 1),
    )
    video.add_argument(
        "--direction", choices=DIRECTIONS, help=with_default("which way to track", f"the server's, {DEFAULT_DIRECTION}")
    )
    video.add_argument(
        "--frame-range",
        type=_int_list,
        metavar="FIRST,LAST",
        help=with_default("the frames tracked", "every frame"),
    )
    video.add_argument(
        "--frame-stride", type=at_least(int, 1), metavar="N", help=with_default("track every N-th frame", 1)
    )
    video.add_argument(
        "--overlay-video",
        action="store_true",
        help=with_default(
            "write OUT/NAME.overlay.mp4, the frames tracked with each object's mask in its colour (needs OpenCV)",
            "none",
        ),
    )
    add_server_options(parser, AMG_SETTINGS, "automatic mask generation (the server's keys, sent when given)")
    add_server_options(parser, (ImageSettings,), "image decoding (the server's keys, sent when given)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The server options the command line gives (the others are not sent)."""
    names = [option.name for option in fields_of(*AMG_SETTINGS, ImageSettings)]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def concept_flags(args: argparse.Namespace) -> list[str]:
    """The concept options the command line gives, by flag."""
    values = {
        "--text": args.text,
        "--exemplar-box": args.exemplar_box,
        "--threshold": args.threshold,
        "--mask-threshold": args.mask_threshold,
        "--max-instances": args.max_instances,
    }
    return [flag for flag, value in values.items() if value is not None and value != []]


def concept_fields(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The concept fields every request of the run sends ({} without --text or --exemplar-box),
    checked as the server checks them; argparse's error (exit 2) for concept options that go with
    no concept, with prompts, or that the server would refuse."""
    if not args.text and not args.exemplar_box:
        given = concept_flags(args)
        if given:
            parser.error(f"{', '.join(given)} qualify concepts: give --text or --exemplar-box with them")
        return {}
    if args.point or args.box or args.prompts is not None:
        parser.error(
            "--text/--exemplar-box ask for every instance of a concept, --point/--box/--prompts for the masks of "
            "prompts: give one kind"
        )
    twice = sorted({phrase for phrase in args.text if args.text.count(phrase) > 1})
    if twice:
        parser.error(f"--text: {', '.join(map(repr, twice))} given twice (each phrase is one concept)")
    boxes, labels = [box for box, _ in args.exemplar_box], [label for _, label in args.exemplar_box]
    try:
        return checked_concepts(
            args.text or None, boxes or None, labels or None, args.threshold, args.mask_threshold, args.max_instances
        )
    except ValueError as exc:
        parser.error(f"--text/--exemplar-box: {exc}")


def images_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[InputImage]:
    """The images the run segments, each with its prompts; argparse's error (exit 2) for
    arguments that ask for none or for prompts in two ways."""
    if args.prompts is not None:
        if args.inputs or args.point or args.box:
            parser.error("--prompts names the images and their prompts: give no INPUT, --point or --box with it")
        try:
            return read_prompt_file(args.prompts)
        except (OSError, ValueError) as exc:
            parser.error(f"--prompts: {exc}")
    if not args.inputs:
        parser.error("give INPUTs (image files, folders, globs) or --prompts FILE.jsonl")
    points, labels = [p for p, _ in args.point], [label for _, label in args.point]
    if points or args.box:
        try:
            checked_prompts(points or None, labels or None, args.box or None)
        except ValueError as exc:
            parser.error(f"--point/--box: {exc}")
    images, errors = find_images(args.inputs, args.out, Prompts(points, labels, list(args.box)))
    for error in errors:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
    if not images:
        parser.error("no images to segment")
    return images


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


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The run `args` asks for (see the module's docstring); returns the exit status."""
    if args.frame is not None or any(is_video(Path(name)) for name in args.inputs):
        return run_videos(parser, args)
    concepts = concept_fields(parser, args)
    names = concept_names(concepts) if concepts else ()
    images = images_of(parser, args)
    try:
        if concepts:
            options = checked_options(server_options(args), prompted=True, asked="concepts")
        else:
            options = checked_options(server_options(args), prompted=any(image.prompts for image in images))
    except ValueError as exc:
        parser.error(str(exc))
    image_options = {key: value for key, value in options.items() if key in IMAGE_RULES}
    results = Results(
        args.out,
        not args.no_overlay,
        args.labels,
        args.coco is not None,
        ImageSettings(**image_options),
        args.overlay_banner,
        names,
    )
    failures = args.failures or args.out / "failures.jsonl"
    clashing = clashes(images, args.out, results.suffixes(), [failures, *([args.coco] if args.coco else [])])
    if clashing:
        parser.error("refusing to write one file twice:\n  " + "\n  ".join(clashing))

    failures.parent.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline({**options, **concepts}, results, resume=not args.force)
    workers = Workers(pipeline, lambda: connect(args), args.concurrency)

    def on_sigint(signum: int, frame: Any) -> None:
        workers.interrupt()
        # A second Ctrl-C interrupts the clean-up too.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    bar = tqdm(
        total=len(images), unit="img", file=sys.stderr, disable=PROGRESS_DISABLE[args.progress], bar_format=BAR_FORMAT
    )
    with open(failures, "w") as report, bar:
        tally = Tally(bar, report, args.out, on_refused=workers.interrupt)
        bar.set_postfix(failed=0, skipped=0)
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            handled = workers.run(images, tally)
        finally:
            signal.signal(signal.SIGINT, previous)

    return finish(args, tally, len(images), handled, workers.stop.is_set(), failures, names)


def connect(args: argparse.Namespace) -> SamClient:
    """A SamClient to the server, token and retries the command line names."""
    return SamClient(
        args.url,
        args.model,
        args.token,
        wire=args.wire,
        retries=args.retries,
        backoff=args.backoff,
        timeout=args.timeout,
    )


def video_prompts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The prompts of a video run: the --prompts file, or one object marked by --point/--box."""
    if args.prompts is not None:
        if args.point or args.box:
            parser.error("--prompts holds the videos' prompts: give no --point or --box with it")
        try:
            return read_prompts(args.prompts)
        except (OSError, ValueError) as exc:
            parser.error(f"--prompts: {exc}")
    if not args.point and not args.box:
        parser.error("a video needs prompts: --point and/or --box (on --frame, default 0), or --prompts FILE.json")
    if len(args.box) > 1:
        parser.error("an object takes one --box a frame")
    prompt: dict[str, Any] = {"frame": args.frame or 0, "object": args.object}
    if args.point:
        prompt.update(points=[p for p, _ in args.point], labels=[label for _, label in args.point])
    if args.box:
        prompt["boxes"] = list(args.box)
    problem = label_problem([prompt])
    if problem:
        parser.error(f"--object: {problem}")
    return [prompt]


def run_videos(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Track each INPUT file (see the module's docstring); returns the exit status."""
    paths = [Path(name) for name in args.inputs]
    if not paths:
        parser.error("give the video files (or TIFF stacks) to track")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        parser.error(f"not a file: {', '.join(missing)} (videos are tracked a file at a time)")
    given = concept_flags(args)
    if given:
        parser.error(f"{', '.join(given)}: concepts are found in images, not in videos or stacks tracked with --frame")
    prompts = video_prompts(parser, args)
    if args.overlay_video and importlib.util.find_spec("cv2") is None:
        parser.error(OPENCV_NEEDED)
    options = server_options(args)
    amg = sorted(set(options) & set(AMG_RULES))
    if amg:
        parser.error(f"option(s) {', '.join(amg)} apply to automatic mask generation of images, not to videos")
    track_options = {"direction": args.direction, "frame_range": args.frame_range, "frame_stride": args.frame_stride}
    options.update({name: value for name, value in track_options.items() if value is not None})
    client = connect(args)
    failures = args.failures or args.out / "failures.jsonl"
    failures.parent.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = done = 0

    def progress(total: int) -> tqdm:
        return tqdm(
            total=total, unit="frame", file=sys.stderr, disable=PROGRESS_DISABLE[args.progress], bar_format=BAR_FORMAT
        )

    with client, open(failures, "w") as report:
        for path in paths:
            try:
                frames = track_file(client, path, args.out, prompts, options, progress, args.overlay_video)
            except NotAuthorized as exc:
                print(refusal(exc.status, exc.message), file=sys.stderr)
                return EXIT_NOT_AUTHORIZED
            except (SamError, OSError, ValueError) as exc:
                failed += 1
                status = exc.status if isinstance(exc, SamError) else None
                reason = exc.message if isinstance(exc, SamError) else str(exc)
                print(f"{path}: FAILED: {exc}", file=sys.stderr)
                report.write(json.dumps({"file": str(path), "status": status, "reason": reason}) + "\n")
                continue
            done += 1
            print(f"{path}: {frames} frames -> {args.out / (path.stem + MASKLETS)}, {args.out / (path.stem + LABELS)}")
    print(f"{done} of {len(paths)} videos tracked" + (f", {failed} failed (see {failures})" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


def refusal(status: int | None, reason: str | None) -> str:
    """The error line of a refused token: the server's answer of HTTP `status` and its `reason` (which,
    when no token was sent, says where the client looked for one), and where to find a token."""
    return (
        f"{PROG}: error: the server refused the token (HTTP {status}: {reason}); nothing more was sent. "
        f"Pass the inference token with --token=VALUE or ${TOKEN_ENV}; without either, the client takes the key "
        f"file `make serve` recorded for the server's URL, else ./{KEY_FILE}"
    )


def summary(images: int, segmented: int, skipped: int, failed: int, failures: Path) -> str:
    """The run's last line: what this run did with its `images`: how many it `segmented`, `skipped`
    (done by an earlier run) and `failed` (reported in `failures`); an interrupted run leaves the rest."""
    done = [f"{segmented} segmented"]
    if skipped:
        done.append(f"{skipped} already done (skipped)")
    if failed:
        done.append(f"{failed} failed (see {failures})")
    return f"{images} image{'' if images == 1 else 's'}: " + ", ".join(done)


def finish(
    args: argparse.Namespace,
    tally: Tally,
    images: int,
    handled: int,
    stopped: bool,
    failures: Path,
    concepts: tuple[str, ...] = (),
) -> int:
    """Say how the run of `images` went (`handled` of them, `stopped` before the end), write the
    COCO file of what was done (its categories the run's `concepts`, if any), and return the exit
    status."""
    refused = tally.refused
    if refused is not None:
        print(refusal(refused.status, refused.reason), file=sys.stderr)
    elif stopped:
        print(f"interrupted: {images - handled} images not done; run the same command again to resume", file=sys.stderr)
    print(summary(images, tally.segmented, tally.skipped, tally.failed, failures))
    coco_failed = False
    if args.coco:
        try:
            annotations = write_coco_file(args.coco, tally.done, concepts)
            print(f"COCO: {len(tally.done)} images, {annotations} annotations -> {args.coco}")
        except (OSError, ValueError) as exc:
            print(f"{PROG}: error: the COCO file was not written: {exc}", file=sys.stderr)
            coco_failed = True
    if refused is not None:
        return EXIT_NOT_AUTHORIZED
    if stopped:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if tally.failed or coco_failed else EXIT_OK


def options_table() -> str:
    """The options of the command line as a Markdown table (docs/client.md holds it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| option | default | what it does |", "|---|---|---|"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        text, _, default = (action.help or "").rpartition(" (default: ")
        if action.metavar:
            shown = f" {action.metavar}"
        else:
            shown = f" {'|'.join(map(str, action.choices))}" if action.choices else ""
        flags = ", ".join(f"`{flag}{shown}`" for flag in action.option_strings)
        rows.append(f"| {cell(flags)} | {cell(default.removesuffix(')'))} | {cell(text)} |")
    return "\n".join(rows) + "\n"


def exit_codes_table() -> str:
    """The exit statuses as a Markdown table (docs/client.md holds it)."""
    return "\n".join(["| status | meaning |", "|---|---|", *(f"| {c} | {m} |" for c, m in EXIT_CODES.items())]) + "\n"
