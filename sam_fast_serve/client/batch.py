"""A run over many images: each image's way (resume, read, send, write), worker threads that keep
requests in flight, and the tally the main thread keeps (console lines, progress bar, failures
report, the images done for the COCO file).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from sam_fast_serve.client.coco import CocoImage
from sam_fast_serve.client.http import NotAuthorized, SamClient, SamError
from sam_fast_serve.client.inputs import InputImage
from sam_fast_serve.client.results import Files, Outcome, Results, write_files

# The reason of an empty input file, which is not sent (the server would refuse it).
EMPTY_FILE = "the file is empty (0 bytes)"


@dataclass(frozen=True)
class Pipeline:
    """What happens to one image in this run: `options` go with every request, `results` says
    what is written; with `resume`, an image an earlier run did is not sent again."""

    options: Mapping[str, Any]
    results: Results
    resume: bool

    def segment(self, client: SamClient, image: InputImage) -> tuple[Outcome, Files]:
        """Segment one image (or find it done by an earlier run): its outcome and the files to
        write. The answer is dropped on return, so memory does not grow with the run."""
        if self.resume:
            payload = self.results.earlier(image)
            if payload is not None:
                return self.results.resumed(image, payload)
        try:
            data = image.path.read_bytes()
        except OSError as exc:
            return Outcome.failure(image, f"cannot read the image: {exc.strerror or exc}"), []
        if not data:
            return Outcome.failure(image, EMPTY_FILE), []
        started = time.perf_counter()
        try:
            answer = client.send(data, {**self.options, **image.prompts.fields()})
        except NotAuthorized as exc:
            return Outcome.failure(image, exc.message, exc.status, sent=True, refused=True), []
        except SamError as exc:
            return Outcome.failure(image, exc.message, exc.status, sent=True), []
        return self.results.answered(image, data, answer, time.perf_counter() - started)


class Workers:
    """`concurrency` threads, each with its own SamClient from `connect`, segmenting the images
    `run` hands them.

    Daemon threads rather than a ThreadPoolExecutor (whose threads are joined at exit), so that
    after Ctrl-C the client exits without waiting for the requests in flight. Files are written
    holding `_writing` and only while `stop` is clear, so once `run` returns after `interrupt`
    no file is being written and none will be.
    """

    def __init__(self, pipeline: Pipeline, connect: Callable[[], SamClient], concurrency: int) -> None:
        self.pipeline = pipeline
        self.connect = connect
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
        with self.connect() as client:
            while (image := self.jobs.get()) is not None and not self.stop.is_set():
                try:
                    outcome, files = self.pipeline.segment(client, image)
                    with self._writing:
                        if self.stop.is_set():
                            return  # interrupted: the answer is dropped, nothing written
                        self.results.put(write_files(outcome, files))
                except BaseException as exc:
                    self.results.put(exc)
                    return

    def run(self, images: Sequence[InputImage], handle: Callable[[Outcome], None]) -> int:
        """Segment `images`, calling `handle` in this thread with each outcome as it comes, until
        all are handled or `interrupt` is called. Until the first request is answered one image
        is out at a time (so a refused token costs one request); then at most two per thread
        (one being segmented, one waiting), so memory does not grow with the number of images.
        Returns how many were handled."""
        window = 1
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
                    if item.sent:
                        window = 2 * len(self.threads)
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
    JSON line per failed image, flushed), and the images done, for the COCO file. The first
    outcome whose token was refused calls `on_refused` (which stops the run) and is kept in
    `refused`; it is no image's failure."""

    def __init__(self, bar: tqdm, report: TextIO, out: Path, on_refused: Callable[[], None]) -> None:
        self.bar = bar
        self.report = report
        self.out = out
        self.on_refused = on_refused
        self.segmented = self.skipped = self.failed = 0
        self.refused: Outcome | None = None
        self.done: list[CocoImage] = []

    def __call__(self, outcome: Outcome) -> None:
        if outcome.refused:
            if self.refused is None:
                self.refused = outcome
                self.on_refused()
            return
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
