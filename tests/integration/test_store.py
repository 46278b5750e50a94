"""The shared embedding store against a real Redis (Debian's redis-server on 127.0.0.1, started and
stopped by the tests): round trips, model identity in the key, bad entries as misses, and what a
request gets while Redis is down, stalled, and back."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import time

import pytest
import redis
import torch

from harness.archives import model_type_of
from harness.files import encode
from harness.servers import RedisServer
from sam_fast_serve.common.errors import ServiceUnavailable
from sam_fast_serve.models.embedding import EmbeddingCache, EmbeddingStore, ImageEmbedding, pixel_key
from sam_fast_serve.server.service import MaskService
from sam_fast_serve.server.store import ModelIdentity, RedisEmbeddings, encode_entry

SHAPE = (256, 64, 64)
IDENTITY = ModelIdentity("vit_b", "ab" * 32, torch.bfloat16)
# A generous bound for "no worker hangs on Redis": the store waits at most 0.25 s per command.
HANG_BOUND_S = 2.0


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def embedding(seed: int, dtype: torch.dtype = torch.bfloat16) -> ImageEmbedding:
    features = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(seed)).to(dtype)
    return ImageEmbedding({"features": features}, (1024, 683), (512, 342))


def shared(server: RedisServer, identity: ModelIdentity = IDENTITY, ttl_s: int = 60) -> RedisEmbeddings:
    return RedisEmbeddings(server.url, identity, {"features": (1, *SHAPE)}, ttl_s)


def same(a: ImageEmbedding | None, b: ImageEmbedding) -> bool:
    return (
        a is not None
        and a.tensors.keys() == b.tensors.keys()
        and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b.tensors)
        and (a.input_size, a.original_size) == (b.input_size, b.original_size)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_with_ttl(redis_server, dtype):
    identity = ModelIdentity("vit_b", "ab" * 32, dtype)
    store = shared(redis_server, identity, ttl_s=120)
    original = embedding(1, dtype)
    store.put("img", original)
    assert same(store.get("img"), original)
    assert store.get("other") is None
    assert 0 < store.client.ttl(identity.key_prefix() + "img") <= 120


SAM2_LAYOUT = {"image_embed": (1, 256, 64, 64), "high_res_0": (1, 32, 256, 256), "high_res_1": (1, 64, 128, 128)}


def sam2_embedding(seed: int) -> ImageEmbedding:
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=generator).bfloat16() for name, shape in SAM2_LAYOUT.items()}
    return ImageEmbedding(tensors, (1024, 1024), (512, 342))


def test_a_sam2_entry_carries_all_its_tensors_and_fits_no_other_layout(redis_server):
    identity = ModelIdentity("sam2.1_hiera_tiny", "ab" * 32, torch.bfloat16)
    store = RedisEmbeddings(redis_server.url, identity, SAM2_LAYOUT, 60)
    original = sam2_embedding(3)
    store.put("img", original)
    assert same(store.get("img"), original)
    # The same bytes read as another family's (or another size's) embedding are a miss, whatever
    # the key: a header that does not list exactly the layout's tensors is refused.
    sam1_view = RedisEmbeddings(redis_server.url, identity, {"features": (1, *SHAPE)}, 60)
    assert sam1_view.get("img") is None
    smaller = {**SAM2_LAYOUT, "high_res_0": (1, 32, 128, 128)}
    assert RedisEmbeddings(redis_server.url, identity, smaller, 60).get("img") is None
    store.client.set(identity.key_prefix() + "sam1", encode_entry(embedding(1)))
    assert store.get("sam1") is None


def test_models_never_read_each_others_entries(redis_server):
    store = shared(redis_server)
    store.put("img", embedding(1))
    for other in (
        ModelIdentity("vit_b", "cd" * 32, torch.bfloat16),  # other weights
        ModelIdentity("vit_l", "ab" * 32, torch.bfloat16),  # other model type
        ModelIdentity("vit_b", "ab" * 32, torch.float32),  # other dtype
        ModelIdentity("vit_b", "ab" * 32, torch.bfloat16, "int8"),  # bf16 embeddings, int8 encoder linears
        ModelIdentity("sam2.1_hiera_tiny", "ab" * 32, torch.bfloat16),  # another family
    ):
        assert other.key_prefix() != IDENTITY.key_prefix()
        assert shared(redis_server, other).get("img") is None


def test_corrupt_truncated_and_foreign_entries_are_misses(redis_server):
    store = shared(redis_server)
    whole = encode_entry(embedding(1))
    foreign_shape = encode_entry(
        ImageEmbedding({"features": torch.zeros(1, 32, 64, 64, dtype=torch.bfloat16)}, (1024, 1024), (8, 8))
    )
    foreign_dtype = encode_entry(embedding(1, torch.float32))
    header_end = whole.index(b"}") + 1
    nested = b"[" * 30_000 + b"]" * 30_000
    lying_header = whole[:header_end].replace(b'"original_size": [512, 342]', b'"original_size": [0, 342]')
    for bad in (
        b"",
        b"not an embedding",
        whole[: len(whole) // 2],  # cut short
        whole + b"\0",  # longer than its header says
        whole[:12] + b"{broken json" + whole[header_end:],
        lying_header + whole[header_end:],
        foreign_shape,
        foreign_dtype,
        os.urandom(len(whole)),
        whole[:8] + struct.pack(">I", 1 << 30) + whole[12:],  # a header longer than the entry
        whole[:8] + struct.pack(">I", len(nested)) + nested + whole[header_end:],  # nested past json's depth
        encode_entry(ImageEmbedding(embedding(1).tensors, (1024, 1024), (100_000, 100_000))),  # 10^10 pixels
    ):
        store.client.set(IDENTITY.key_prefix() + "img", bad)
        assert store.get("img") is None, bad[:40]
    store.client.set(IDENTITY.key_prefix() + "img", whole)
    assert same(store.get("img"), embedding(1))


def test_redis_down_stalled_and_back(redis_server):
    store = EmbeddingStore(EmbeddingCache(0), shared(redis_server))  # no local copy: every read asks Redis
    store.put("img", embedding(1))
    assert same(store.fetch("img"), embedding(1)) and store.counts["shared_hit"] == 1

    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as down:
        store.fetch("img")  # only a key: the caller cannot go on without the store
    assert down.value.status == 503 and "Redis" in down.value.message
    assert store.get("img") is None  # the caller has the image: a miss
    store.put("img2", embedding(2))  # skipped, not raised
    assert time.monotonic() - started < HANG_BOUND_S
    assert store.counts["shared_error"] == 3

    redis_server.start()  # same port, empty (no persistence)
    assert store.fetch("img") is None and store.counts["shared_miss"] == 1  # reconnected by itself
    store.put("img", embedding(1))
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            store.fetch("img")
        store.put("img3", embedding(3))
        assert time.monotonic() - started < HANG_BOUND_S
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert same(store.fetch("img"), embedding(1))


def test_memory_limit_evicts_instead_of_failing(tmp_path):
    server = RedisServer(tmp_path, maxmemory="8mb")  # room for about three bf16 vit_b embeddings
    server.start()
    try:
        store = shared(server)
        for i in range(8):
            store.put(f"img{i}", embedding(i))
        kept = [i for i in range(8) if store.get(f"img{i}") is not None]
        assert 0 < len(kept) < 8 and 7 in kept
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["random_checkpoint", "random_sam2_checkpoint"], ids=["sam1", "sam2"])
def services_on_one_redis(request, tmp_path_factory, gpu_id):
    """Two mask services ("workers") of one family's test architecture sharing one Redis store,
    and the Redis server."""
    checkpoint = request.getfixturevalue(request.param)
    work = tmp_path_factory.mktemp("shared-store")
    server = RedisServer(work)
    server.start()
    model_dir = work / "model"
    model_dir.mkdir()
    (model_dir / checkpoint.name).symlink_to(checkpoint)
    section = {"model_type": model_type_of(checkpoint), "sam_checkpoint": checkpoint.name, "dtype": "float32",
               "embedding_store": server.url, "points_per_side": 2}  # fmt: skip
    try:
        yield [MaskService.load(section, model_dir, gpu_id=gpu_id) for _ in range(2)], server
    finally:
        server.stop()


def ask(service: MaskService, document: dict) -> tuple[int, dict]:
    reply = service.handle([({"body": document}, {"Accept": "application/json"})])[0]
    return reply.status, json.loads(reply.body)


def test_loading_a_worker_leaves_the_shared_store_alone(services_on_one_redis):
    # Runs first on the fixture: two workers loaded and warmed up, no request yet.
    services, server = services_on_one_redis
    assert redis.Redis.from_url(server.url).dbsize() == 0
    assert all(not service.engine.predictor.store.counts for service in services)


def test_an_image_id_from_one_worker_is_answered_by_another(services_on_one_redis, chelsea):
    (first, second), server = services_on_one_redis
    image = base64.b64encode(encode(chelsea)).decode()
    status, direct = ask(first, {"image": image, "points": [[100, 120]]})
    assert status == 200 and direct["image_id"] == pixel_key(chelsea)
    calls = second.engine.predictor.encoder_calls
    status, by_id = ask(second, {"image_id": direct["image_id"], "points": [[100, 120]]})
    assert status == 200 and by_id == direct
    assert second.engine.predictor.encoder_calls == calls  # from Redis, not encoded again
    assert second.engine.predictor.store.counts["shared_hit"] >= 1

    status, unknown = ask(second, {"image_id": "0" * 32, "points": [[1, 1]]})
    assert status == 404 and "send the image again" in unknown["message"]

    server.stop()
    try:
        status, down = ask(second, {"image_id": "1" * 32, "points": [[1, 1]]})
        assert status == 503 and down["error"] == "store_unavailable"
        status, with_image = ask(
            second, {"image": base64.b64encode(encode(chelsea[::-1])).decode(), "points": [[5, 5]]}
        )
        assert status == 200  # the request carries its image: answered without the store
    finally:
        server.start()
    status, again = ask(second, {"image": image, "points": [[100, 120]]})
    assert status == 200 and again == direct


def test_automatic_request_reads_another_workers_embedding_once(services_on_one_redis, astronaut):
    (first, second), _ = services_on_one_redis
    image = base64.b64encode(encode(astronaut[:300, :400])).decode()
    status, encoded_there = ask(first, {"image": image})
    assert status == 200
    calls, counts = second.engine.predictor.encoder_calls, dict(second.engine.predictor.store.counts)
    status, answered_here = ask(second, {"image": image})
    assert status == 200 and answered_here == encoded_there
    assert second.engine.predictor.encoder_calls == calls  # the embedding came from Redis
    after = second.engine.predictor.store.counts
    read = {name: after[name] - counts.get(name, 0) for name in ("local_hit", "local_miss", "shared_hit")}
    assert read == {"local_hit": 0, "local_miss": 1, "shared_hit": 1}  # one lookup, not one per step
