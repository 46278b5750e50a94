"""The sam-fast client from a checkout: the same as the `sam-fast-client` command.

python inference.py                 segment samples/astronaut.jpg against the local server
                                    (127.0.0.1:8080), writing out/astronaut.json and
                                    out/astronaut.overlay.png, and print their paths
python inference.py INPUT... [...]  the client: see `python inference.py --help` and docs/client.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from sam_fast_serve.client.cli import main

SAMPLE = Path(__file__).resolve().parent / "samples" / "astronaut.jpg"

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(SAMPLE)]))
