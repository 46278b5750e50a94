"""TorchServe handler for SAM automatic mask generation: a thin adapter over sam_fast_serve.

Everything but the TorchServe plumbing (config, image decoding, the engine, the wire format) lives
in the sam_fast_serve package, which imports nothing from ts and is tested on its own.
"""

import logging
from pathlib import Path
from typing import Any, Dict, List

from ts.torch_handler.base_handler import BaseHandler

from sam_fast_serve.service import MaskService

logger = logging.getLogger(__name__)


class SamAutomaticMaskHandler(BaseHandler):
    """Loads the model named by model-config.yaml's `handler:` section and serves each request
    with its own status: one bad image in a batch does not fail the others."""

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        handler_section = (context.model_yaml_config or {}).get("handler")
        # A ConfigError raised here fails the model load; its message names the key or file.
        self.service = MaskService.load(handler_section, Path(properties["model_dir"]), properties.get("gpu_id"))
        self.context = context
        self.initialized = True

    def handle(self, data: List[Dict[str, Any]], context: Any) -> List[str]:
        requests = [(fields, context.get_all_request_header(i)) for i, fields in enumerate(data)]
        replies = self.service.handle(requests)
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, reply.content_type)
            for name, value in reply.headers.items():
                context.set_response_header(index, name, value)
            if reply.status != 200:
                context.set_response_status(reply.status, "", index)
        return [reply.body for reply in replies]
