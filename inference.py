"""Client for the sam-fast TorchServe endpoint: the same as the `sam-fast-client` command.

python inference.py INPUT... [--url URL] [--model NAME] [--token TOKEN] [--out DIR] [--coco FILE]
                    [--concurrency N] [--format pickle|json] [--point X,Y[:LABEL] ...] [--box X0,Y0,X1,Y1 ...]

INPUTs are image files, folders and globs; see `python inference.py --help` and sam_fast_serve/client.py.
"""

from __future__ import annotations

import sys

from sam_fast_serve.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
