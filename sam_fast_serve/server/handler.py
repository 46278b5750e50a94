"""The TorchServe handler for SAM mask generation: a thin adapter over server.service, and the only
module of the package that imports ts (the top-level custom_handler.py subclasses it); everything
else is tested without TorchServe.

TorchServe's own `handle` stays in charge (it records the HandlerTime metric); the service's three
steps are its preprocess -> inference -> postprocess, and its metrics go to TorchServe's metrics API.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.protocol.otf_message_handler import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from sam_fast_serve.server.formats import Body
from sam_fast_serve.server.jobs import Job, TrackJob
from sam_fast_serve.server.metrics import Metric
from sam_fast_serve.server.responses import Reply
from sam_fast_serve.server.runtime import configure_threads
from sam_fast_serve.server.service import Answer, MaskService, Tracked


class SamAutomaticMaskHandler(BaseHandler):
    """Loads the model named by model-config.yaml's `handler:` section and serves each request
    with its own status: one bad image in a batch does not fail the others."""

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_config = context.model_yaml_config or {}
        handler_section = model_config.get("handler")
        # The workers of this model share the cores: at most maxWorkers of them run at once.
        configure_threads(int(model_config.get("maxWorkers", model_config.get("minWorkers", 1))))
        # A ConfigError raised here fails the model load; its message names the key or file.
        self.context = context
        self.service = MaskService.load(
            handler_section, Path(properties["model_dir"]), properties.get("gpu_id"), self.publish
        )
        self.initialized = True

    def publish(self, metric: Metric, value: float, labels: Mapping[str, str]) -> None:
        """One observation to TorchServe's metrics API, under the labels TorchServe gives model
        metrics (ModelName, Level; it adds Hostname) and the metric's own."""
        dimensions = [Dimension("ModelName", self.context.model_name), Dimension("Level", "Model")]
        dimensions += [Dimension(name, value) for name, value in labels.items()]
        self.context.metrics.add_metric(metric.name, value, metric.unit, None, dimensions, MetricTypes(metric.kind))

    def preprocess(self, data: list[dict[str, Any]]) -> list[Job | TrackJob | Reply]:
        return self.service.decode([(fields, self.context.get_all_request_header(i)) for i, fields in enumerate(data)])

    def inference(
        self, data: list[Job | TrackJob | Reply], *args: Any, **kwargs: Any
    ) -> list[Answer | Tracked | Reply]:
        return self.service.predict(data, self.stream)

    def stream(self, index: int, body: Body, content_type: str) -> None:
        """One line of request `index`'s answer sent now, as a TorchServe intermediate response (a
        chunk of the HTTP response); the final response, from postprocess, ends it."""
        self.context.set_response_content_type(index, content_type)
        request_id = self.context.request_ids[index]
        send_intermediate_predict_response(
            {index: body}, {index: request_id}, "Intermediate response", 200, self.context
        )

    def postprocess(self, data: list[Answer | Tracked | Reply]) -> list[str | bytes]:
        replies = self.service.encode(data)
        for index, reply in enumerate(replies):
            self.context.set_response_content_type(index, reply.content_type)
            for name, value in reply.headers.items():
                self.context.set_response_header(index, name, value)
            if reply.status != 200:
                self.context.set_response_status(reply.status, "", index)
        return [reply.body for reply in replies]
