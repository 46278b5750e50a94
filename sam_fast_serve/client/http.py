"""SamClient: requests to a sam-fast TorchServe from Python, each answer decoded safely, each
failure a typed error. The command line's batch code sends every image through it.

    from sam_fast_serve.client import SamClient

    with SamClient("http://127.0.0.1:8080", token=TOKEN) as sam:  # or SamClient(): see there
        masks = sam.segment("photo.jpg", points_per_side=16)      # COCO RLE records
        answer = sam.prompt(masks.image_id, points=[[200, 150]])  # the image's embedding, reused
        people = sam.concepts("photo.jpg", ["person", "helmet"])  # a SAM 3 model: every instance
        for record in sam.track("clip.mp4", [{"frame": 0, "object": 1, "points": [[80, 60]]}]):
            ...                                                   # a record a frame, as they come

Connection errors, 503s and TorchServe's 507 "Worker died." (it restarts the worker) are retried
with exponential backoff; other answers are not. A SamClient holds one HTTP session: give each
thread its own.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests

from sam_fast_serve.client.coco import is_concept_list, mask_size
from sam_fast_serve.client.fields import checked_concepts, checked_options, checked_prompts, concept_names
from sam_fast_serve.common.concepts import has_concepts
from sam_fast_serve.common.endpoint import INFERENCE_URL, MODEL_NAME, default_inference_token, missing_token
from sam_fast_serve.common.prompts import has_prompts
from sam_fast_serve.common.tracks import VIDEO_FIELD
from sam_fast_serve.common.wire import (
    IMAGE_ID_HEADER,
    JSON_MEDIA_TYPE,
    MAX_REQUEST_SIZE,
    decode_pickled,
    is_annotation_list,
    is_prompt_response,
)

URL_ENV = "SAM_FAST_URL"  # the server a laptop talks to, set once like $TS_INFERENCE_TOKEN
WIRES = ("pickle", "json")  # how answers travel; decoded, they are the same
RETRIES, BACKOFF, TIMEOUT = 4, 1.0, 600.0
# TorchServe answers a wrong or missing token with a 400 of this type; a gateway with 401 or 403.
TORCHSERVE_TOKEN_REFUSED = "InvalidKeyException"
AUTH_STATUSES = (401, 403)
_IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")

ImageSource = bytes | str | os.PathLike[str]


class SamError(Exception):
    """The server did not answer a request with masks: why (`message`), and the HTTP status of
    its answer (`status`, None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.message = message
        self.status = status


class TransportError(SamError):
    """No answer: the server cannot be reached (after the retries) or did not answer in time."""


class NotAuthorized(SamError):
    """The token was refused (TorchServe's 400 InvalidKeyException, a gateway's 401 or 403); when
    none was sent, the message says where the client looked for one."""


class BadRequestError(SamError):
    """A 4xx: the server refused this request; `kind` is its error kind (e.g. "invalid_option")."""

    def __init__(self, message: str, status: int, kind: str | None = None) -> None:
        super().__init__(message, status)
        self.kind = kind


class ServerBusy(SamError):
    """503 or a worker that died, after the retries: trying again later may succeed."""


class ServerError(SamError):
    """Another 5xx: the server failed on this request (500 internal error, 507 out of memory)."""


class BadAnswer(SamError):
    """A 200 whose body the client refuses: not the answer asked for, a malformed mask, or a
    pickle that names a global."""


class Annotations(list[dict[str, Any]]):
    """The masks of automatic mask generation (COCO RLE records, segment_anything's keys) or of
    concepts (segmentation, area, bbox, score, concept), and `image_id`: the image's key for
    prompts and concepts without sending it again (None if the server sent none)."""

    def __init__(self, records: Sequence[dict[str, Any]], image_id: str | None) -> None:
        super().__init__(records)
        self.image_id = image_id


@dataclass(frozen=True)
class Answer:
    """A decoded 200: the annotation list or prompted answer, the image's key, the body's bytes."""

    payload: Any
    image_id: str | None
    size: int


def unexplained(status: int, text: str, file_size: int | None) -> str:
    """The reason of an error answer of HTTP `status` whose body `text` gives none (not JSON with a
    message). A 413 of a request that sent a file of `file_size` bytes is the server's request size
    limit: TorchServe refuses a longer body with an empty 413 before the handler sees it. Any other
    status is named with what it means, and the start of the body follows when there is one."""
    if status == 413 and file_size is not None:
        return (
            f"the server refused the request before reading it: the file is {file_size / 2**20:.1f} MiB "
            f"({file_size} bytes), and the request is over the server's request size limit (TorchServe's "
            f"max_request_size; this project's config.properties sets {MAX_REQUEST_SIZE} bytes = "
            f"{MAX_REQUEST_SIZE / 2**20:g} MiB)"
        )
    try:
        meaning = f"{HTTPStatus(status).phrase}: {HTTPStatus(status).description.lower()}"
    except ValueError:
        meaning = "a status HTTP does not define"
    body = text.strip()[:200]
    began = f"; its answer began {body!r}" if body else ""
    return f"the server answered {status} ({meaning}) without a reason{began}"


def _message(reply: requests.Response, file_size: int | None) -> tuple[str, str | None]:
    """The "message" of an error answer's JSON body (else `unexplained`'s reason, for a request
    that sent a file of `file_size` bytes), and its kind ("error", ours, or "type", TorchServe's)."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        kind = body.get("error", body.get("type"))
        return body["message"], kind if isinstance(kind, str) else None
    return unexplained(reply.status_code, reply.text, file_size), None


def _is_transient(reply: requests.Response) -> bool:
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


def error_of(reply: requests.Response, file_size: int | None = None) -> SamError:
    """The error a non-200 answer stands for (`file_size`: the bytes of the file the request sent)."""
    message, kind = _message(reply, file_size)
    status = reply.status_code
    if status in AUTH_STATUSES or (status == 400 and kind == TORCHSERVE_TOKEN_REFUSED):
        return NotAuthorized(message, status)
    if _is_transient(reply):
        return ServerBusy(message, status)
    if status < 500:
        return BadRequestError(message, status, kind)
    return ServerError(message, status)


def read_image(image: ImageSource) -> bytes:
    """The file bytes of `image`: bytes as they are, else the file at that path (OSError if unreadable)."""
    return image if isinstance(image, bytes) else Path(image).read_bytes()


class SamClient:
    """Requests to the model `model` of the TorchServe at `url` (its inference address).

    `url`: None takes $SAM_FAST_URL, else http://127.0.0.1:8080. `token`: the inference token;
    None takes $TS_INFERENCE_TOKEN, else the key file recorded for that server (`make serve`
    records it), else ./key_file.json (what TorchServe writes where it starts), and "" sends none;
    when none is found, a refusal says where the client looked. `wire`: "pickle" (the server's
    default, smaller) or "json"; both decode to the same answer. `retries`, `backoff`: retries of
    connection errors and busy answers, the first after `backoff` seconds, doubling. `timeout`:
    seconds to wait for an answer (not retried: the server may still be working on it).
    """

    def __init__(
        self,
        url: str | None = None,
        model: str = MODEL_NAME,
        token: str | None = None,
        *,
        wire: str = "pickle",
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        timeout: float = TIMEOUT,
    ) -> None:
        if wire not in WIRES:
            raise ValueError(f"wire must be one of {', '.join(WIRES)}, got {wire!r}")
        url = url or os.environ.get(URL_ENV) or INFERENCE_URL
        self.endpoint = f"{url.rstrip('/')}/predictions/{model}"
        self.headers = {"Accept": JSON_MEDIA_TYPE} if wire == "json" else {}
        token = default_inference_token(url) if token is None else token
        # Told with the refusal of a request sent without a token: where none was found, when it was looked for.
        self.missing_token = missing_token(url) if token is None else None
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.session = requests.Session()

    def __enter__(self) -> SamClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def segment(self, image: ImageSource, **options: Any) -> Annotations:
        """Automatic masks of `image` (file bytes or a path). `options` are the server's keys,
        e.g. points_per_side=16, pred_iou_thresh=0.8, page=2, channels=[0], intensity="minmax";
        those not given take the server's settings.

        Raises ValueError (an option the server would refuse, with its message), OSError (the
        file cannot be read), or a SamError.
        """
        answer = self.send(read_image(image), checked_options(options, prompted=False))
        return Annotations(answer.payload, answer.image_id)

    def prompt(
        self,
        image: ImageSource,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        multimask: bool | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """The masks of point and box prompts in image pixels (labels: 1 foreground, the default,
        0 background; each box is one prompt, points join every box). `image` is file bytes, a
        path, or the `image_id` of an earlier answer (32 hex digits; a file of that name: pass a
        Path), which saves sending and encoding the image again. `multimask`: three masks per
        prompt (the server's default for a single point) or one. `options`: image keys (page,
        channels, intensity, percentiles).

        Returns the server's answer: {"image_id": str, "prompts": [{"masks": [records]}, ...]},
        one entry per prompt. Raises as `segment` does; a NotFound image_id is a BadRequestError
        with status 404 (the server no longer holds it: send the image).
        """
        fields = {**checked_options(options, prompted=True), **checked_prompts(points, labels, boxes, multimask)}
        return self._send_to(image, fields).payload

    def concepts(
        self,
        image: ImageSource,
        texts: str | Sequence[str] | None = None,
        *,
        exemplar_boxes: Sequence[Sequence[float]] | None = None,
        exemplar_labels: Sequence[int] | None = None,
        threshold: float | None = None,
        mask_threshold: float | None = None,
        max_instances: int | None = None,
        **options: Any,
    ) -> Annotations:
        """Every instance of each concept in `image` (a SAM 3 server): `texts`, one phrase or a
        list of them, each its own concept; `exemplar_boxes` [[x0, y0, x1, y1], ...] in image
        pixels, examples of the concept (`exemplar_labels`: 1, the default, or 0 for "not one"),
        which join every phrase, or are one concept of their own, "visual", without `texts`.
        `threshold`: the score an instance needs (the server's 0.3), `mask_threshold`: the
        probability a pixel needs (0.5), `max_instances`: at most this many a concept, the best.
        `image` is file bytes, a path, or the `image_id` of an earlier answer, as for `prompt`;
        `options`: image keys (page, channels, intensity, percentiles).

        Returns the records (segmentation as COCO RLE, area, bbox XYWH, score, and the `concept`
        each belongs to: its phrase, or "visual"), each concept's best first, the concepts in the
        order asked, with the image's id as `.image_id`. Raises ValueError (a phrase, box or
        threshold the server would refuse, with its message: nothing is sent), else as `prompt`.
        """
        fields = {
            **checked_options(options, prompted=True, asked="concepts"),
            **checked_concepts(texts, exemplar_boxes, exemplar_labels, threshold, mask_threshold, max_instances),
        }
        answer = self._send_to(image, fields)
        return Annotations(answer.payload, answer.image_id)

    def track(
        self,
        video: ImageSource,
        prompts: Sequence[Mapping[str, Any]],
        *,
        direction: str | None = None,
        frame_range: Sequence[int] | None = None,
        frame_stride: int | None = None,
        **options: Any,
    ) -> Iterator[dict[str, Any]]:
        """Follow objects through a video file or a multi-page TIFF (`video`: file bytes or a path;
        a SAM 2 / 2.1 server): the answer's records as the server sends them (common.tracks): what
        is tracked ({"frames", "objects"}), a record a frame, then the summary ({"done": true, ...}).
        `prompts`: the server's form, [{"frame", "object", "points"/"labels"/"boxes"/"mask"}];
        `options`: image keys (channels, intensity, percentiles).

        Raises as `segment` does; an error that ends an answer part way (the server ran out of
        memory, say) is raised when its line comes, a cut connection as a TransportError.
        """
        fields: dict[str, Any] = {"prompts": [dict(prompt) for prompt in prompts], **checked_options(options, True)}
        given = {"direction": direction, "frame_range": frame_range and list(frame_range), "frame_stride": frame_stride}
        fields.update({name: value for name, value in given.items() if value is not None})
        form = {name: json.dumps(value) for name, value in fields.items()}
        data = read_image(video)
        files = {VIDEO_FIELD: (VIDEO_FIELD, data, "application/octet-stream")}
        reply = self._post(dict(self.headers), {"data": form, "files": files, "stream": True})
        with reply:
            if reply.status_code != 200:
                raise self._error(reply, len(data))
            try:
                for line in reply.iter_lines():
                    if line:
                        record = self._record(line, reply)
                        yield record
                        if record.get("done") is True:
                            return
            except requests.RequestException as exc:
                raise TransportError(f"the answer was cut short: {exc.__class__.__name__}: {exc}") from exc
        raise TransportError("the answer ended before its summary line: the connection was cut")

    def _send_to(self, image: ImageSource, fields: Mapping[str, Any]) -> Answer:
        """`send` `fields` with `image`: file bytes, a path, or an image_id (32 hex digits: a
        JSON request that names the image the server holds instead of sending it)."""
        if isinstance(image, str) and _IMAGE_ID.match(image):
            return self.send(None, {"image_id": image, **fields})
        return self.send(read_image(image), fields)

    @staticmethod
    def _record(line: bytes, reply: requests.Response) -> dict[str, Any]:
        """One line of a video answer, decoded; the error it carries raised."""
        try:
            is_json = reply.headers.get("Content-Type", "").startswith(JSON_MEDIA_TYPE)
            record = json.loads(line) if is_json else decode_pickled(line)
        except Exception as exc:  # an unpickler raises many types on malformed input
            raise BadAnswer(f"refused a line of the server's answer: {exc}") from exc
        if not isinstance(record, dict):
            raise BadAnswer("a line of the server's answer is not a record")
        if isinstance(record.get("code"), int) and isinstance(record.get("message"), str):
            status = record["code"]
            error = BadRequestError(record["message"], status, record.get("error")) if status < 500 else None
            raise error or ServerError(record["message"], status)
        return record

    def send(self, image: bytes | None, fields: Mapping[str, Any]) -> Answer:
        """One request as sent, with its retries: `image` (file bytes; None with an "image_id"
        field) and `fields` (options, prompts or concepts, unchecked), and its decoded answer.

        The image travels as the raw body, or with fields as a multipart file beside one JSON
        form field each; without an image the fields are a JSON body.
        """
        headers = dict(self.headers)
        body: dict[str, Any]
        if image is None:
            headers["Content-Type"] = JSON_MEDIA_TYPE
            body = {"data": json.dumps(dict(fields))}
        elif fields:
            form = {name: json.dumps(value) for name, value in fields.items()}
            body = {"data": form, "files": {"image": ("image", image, "application/octet-stream")}}
        else:
            headers["Content-Type"] = "application/octet-stream"
            body = {"data": image}
        reply = self._post(headers, body)
        if reply.status_code != 200:
            raise self._error(reply, None if image is None else len(image))
        payload = self._decode(reply, fields)
        return Answer(payload, reply.headers.get(IMAGE_ID_HEADER), len(reply.content))

    def _error(self, reply: requests.Response, file_size: int | None) -> SamError:
        """The error of a non-200 answer to a request that sent a file of `file_size` bytes; a
        refusal of a request sent without a token says where the client looked for one."""
        error = error_of(reply, file_size)
        if isinstance(error, NotAuthorized) and self.missing_token:
            return NotAuthorized(f"{error.message}; {self.missing_token}", error.status)
        return error

    def _post(self, headers: dict[str, str], body: dict[str, Any]) -> requests.Response:
        """The first answer that is not transient. Connection errors and transient answers are
        retried `retries` times, waiting backoff, 2*backoff, ... seconds first."""
        for attempt in range(self.retries + 1):
            try:
                reply = self.session.post(self.endpoint, headers=headers, timeout=self.timeout, **body)
            except requests.ConnectionError as exc:
                last: SamError = TransportError(f"cannot reach {self.endpoint} ({exc.__class__.__name__})")
            except requests.RequestException as exc:
                raise TransportError(f"{exc.__class__.__name__}: {exc}") from exc
            else:
                if not _is_transient(reply):
                    return reply
                last = error_of(reply)
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise type(last)(f"{last.message} (after {self.retries + 1} attempts)", last.status)

    @staticmethod
    def _decode(reply: requests.Response, fields: Mapping[str, Any]) -> Any:
        """The payload of a 200: of the kind the request's `fields` ask for (masks of the concepts
        they name, of prompts, or automatic), with well-formed masks; BadAnswer otherwise."""
        try:
            if reply.headers.get("Content-Type", "").startswith(JSON_MEDIA_TYPE):
                payload = reply.json()
            else:
                payload = decode_pickled(reply.content)
        except Exception as exc:  # an unpickler raises many types on malformed input
            raise BadAnswer(f"refused the server's answer: {exc}") from exc
        if has_concepts(fields):
            concepts = concept_names(fields)
            expected, wanted = is_concept_list(payload, concepts), f"the masks of the concepts {', '.join(concepts)}"
        elif has_prompts(fields):
            expected, wanted = is_prompt_response(payload), "masks for prompts"
        else:
            expected, wanted = is_annotation_list(payload), "a list of annotations"
        if not expected:
            raise BadAnswer(f"the server's answer is not {wanted}")
        try:
            mask_size(payload)
        except ValueError as exc:
            raise BadAnswer(f"the server's answer has a malformed mask: {exc}") from exc
        return payload
