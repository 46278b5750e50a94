"""What the shared embedding store costs per prompt: a prompt by image_id answered from the
worker's own LRU (local hit), from Redis (another worker's embedding), and a prompt whose image is
in no store (the encoder runs), through the mask service, with a real redis-server on loopback.
Then the store alone: writing and reading one embedding.

    python -m benchmarks.bench_store [--dtype auto] [--prompts 20]
"""

from __future__ import annotations

import argparse
import base64
import io

from PIL import Image
from skimage import data

from benchmarks.measure import median_seconds, scratch_dir
from harness.servers import RedisServer
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.tools.cli import save_random_checkpoint


def answer(service: MaskService, document: dict) -> None:
    reply = service.handle([({"body": document}, {})])[0]
    assert reply.status == 200, reply.body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()
    work = scratch_dir()
    save_random_checkpoint(work / "random_vit_b.pth")
    redis_server = RedisServer(work, maxmemory="1gb")
    redis_server.start()
    try:
        shared = {"sam_checkpoint": "random_vit_b.pth", "dtype": args.dtype, "embedding_store": redis_server.url}
        encoding = MaskService.load(shared, work, None)  # the worker that encodes each image
        local = encoding  # the same worker again: its LRU has the embedding
        remote = MaskService.load({**shared, "embedding_cache_bytes": 0}, work, None)  # another worker: Redis only
        nothing = MaskService.load({**shared, "embedding_store": "memory", "embedding_cache_bytes": 0}, work, None)
        buffer = io.BytesIO()
        Image.fromarray(data.astronaut()).save(buffer, "PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        first = encoding.handle([({"body": {"image": image, "points": [[100, 100]]}}, {})])[0]
        image_id = first.headers["X-Image-Id"]
        click = {"image_id": image_id, "points": [[200, 150]]}
        rows = [
            ("local hit (this worker's LRU)", lambda: answer(local, click)),
            ("Redis hit (another worker's embedding)", lambda: answer(remote, click)),
            ("miss: image sent, encoder runs", lambda: answer(nothing, {"image": image, "points": [[200, 150]]})),
        ]
        print(f"# bench_store: vit_b, dtype {encoding.dtype}, astronaut 512x512, one click per request, "
              f"median of {args.prompts} (miss: of 3)\n")  # fmt: skip
        print("| prompt | seconds | vs local hit |")
        print("|---|---|---|")
        local_s = None
        for label, run in rows:
            seconds = median_seconds(run, 3 if label.startswith("miss") else args.prompts)
            local_s = local_s or seconds
            print(f"| {label} | {seconds:.4f} | {seconds / local_s:.1f}x |")
        store = remote.engine.store
        assert store.shared is not None
        embedding = store.shared.get(image_id)
        assert embedding is not None
        print(f"\nThe store alone, one embedding of {embedding.nbytes / 2**20:.1f} MiB:\n")
        print("| operation | milliseconds |")
        print("|---|---|")
        print(
            f"| Redis write (header + raw bytes, SET with TTL) | {median_seconds(lambda: store.shared.put('x', embedding), args.prompts) * 1e3:.2f} |"
        )  # type: ignore[union-attr]
        print(
            f"| Redis read (GET + checks + tensor) | {median_seconds(lambda: store.shared.get('x'), args.prompts) * 1e3:.2f} |"
        )  # type: ignore[union-attr]
        print(f"\nstore counts of the Redis-only worker: {dict(store.counts)}")
    finally:
        redis_server.stop()


if __name__ == "__main__":
    main()
