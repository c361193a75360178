"""The storage layer: one contract for the local store and for S3 (moto's standalone server
over HTTP, the real boto3 client); a finished job's artifacts kept there and served from there
after its work dir is gone; retention per event."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from ground.config import StorageConfig
from ground.errors import InvalidInput, NotFound
from orchestrator.engine import Engine
from orchestrator.storage import PART_BYTES, ObjectStore
from orchestrator.storage.local import LocalStore
from orchestrator.storage.s3 import S3Store
from tests.conftest import ALICE, BOB, make_settings, shutdown
from tests.mcp_helpers import script_catalogue
from tests.s3_helpers import BUCKET, S3Server, moto_s3

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    s3: S3Server = request.getfixturevalue("s3")
    return S3Store(StorageConfig.model_validate(s3.storage(prefix=f"t{time.time_ns()}/")))


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_both_stores_write_streams_and_read_ranges(store: ObjectStore) -> None:
    # Bigger than one part, so S3 goes multipart; written a MiB at a time.
    data = os.urandom(PART_BYTES + 3 * (1 << 20) + 17)
    key = store.key("artifacts", "ent-1", "dir/big.bin")
    info = await store.put_stream(key, _chunks(data, 1 << 20))
    assert info.size == len(data)
    assert await store.read(key, 0, 10) == data[:10]
    assert await store.read(key, PART_BYTES - 5, 10) == data[PART_BYTES - 5 : PART_BYTES + 5]
    assert await store.read(key, len(data) - 3, 100) == data[-3:]
    await store.put_bytes(store.key("artifacts", "ent-1", "a.txt"), b"hello")
    listed = {o.key: o.size for o in await store.list(store.key("artifacts", "ent-1") + "/")}
    assert listed == {key: len(data), store.key("artifacts", "ent-1", "a.txt"): 5}
    assert await store.stat(store.key("artifacts", "nothing")) is None
    with pytest.raises(NotFound):
        await store.read(store.key("artifacts", "nothing"), 0, 1)
    assert await store.delete_prefix(store.key("artifacts", "ent-1") + "/") == 2
    assert await store.list(store.key("artifacts", "ent-1") + "/") == []


async def test_both_stores_join_parts_into_one_object_and_drop_the_parts(
    store: ObjectStore,
) -> None:
    """An upload's ranges, received as objects of their own, become its one object."""
    pieces = [os.urandom(PART_BYTES + 5), os.urandom(3), os.urandom(1 << 20)]
    keys = [store.key("uploads", "upl-1", "parts", str(i)) for i in range(len(pieces))]
    for key, piece in zip(keys, pieces, strict=True):
        await store.put_stream(key, _chunks(piece, 1 << 20))
    joined = store.key("uploads", "upl-1", "data")
    info = await store.concat(joined, keys)
    whole = b"".join(pieces)
    assert info.size == len(whole)
    assert await store.read(joined, 0, len(whole)) == whole
    assert [o.key for o in await store.list(store.key("uploads", "upl-1") + "/")] == [joined]
    # One part: moved (renamed), not copied through this process.
    await store.put_bytes(keys[0], b"only")
    assert (await store.concat(joined, keys[:1])).size == 4
    assert await store.read(joined, 0, 10) == b"only" and await store.stat(keys[0]) is None


async def test_object_urls_are_only_those_of_the_configured_bucket(store: ObjectStore) -> None:
    if isinstance(store, LocalStore):
        with pytest.raises(InvalidInput, match='kind = "s3"') as exc:
            store.key_of_url(f"s3://{BUCKET}/x", "inputs.data")
    else:
        assert store.key_of_url(f"s3://{BUCKET}/raw/scan.h5", "inputs.data") == "raw/scan.h5"
        with pytest.raises(InvalidInput, match="not in this server's bucket") as exc:
            store.key_of_url("s3://elsewhere/raw/scan.h5", "inputs.data")
    assert exc.value.field == "inputs.data"


WRITER = """
import os
out = os.environ["SCIORCH_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "sub"), exist_ok=True)
open(os.path.join(out, "table.csv"), "w").write("a,b\\n1,2\\n")
open(os.path.join(out, "sub", "blob.bin"), "wb").write(bytes(range(256)) * 8192)
"""


@pytest_asyncio.fixture(params=["local", "s3"], loop_scope="module")
async def eng(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    storage: dict[str, Any] = {}
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        storage = s3.storage(prefix=f"e{time.time_ns()}/")
    cat = script_catalogue(tmp_path, "writer", WRITER, {})
    engine = await Engine.open(
        make_settings(tmp_path / "home", catalogue_dirs=[cat], storage=storage)
    )
    try:
        yield engine
    finally:
        await shutdown(engine)


async def test_artifacts_outlive_the_work_dir_and_are_read_from_storage(eng: Engine) -> None:
    entry = await eng.launch(ALICE, "writer")
    done, timed_out = await eng.wait_entry(ALICE, entry.id, timeout_s=30)
    assert done.state == "succeeded" and not timed_out, done.reason
    before = {a.path: a for a in await eng.list_artifacts(ALICE, entry.id)}
    assert set(before) == {"table.csv", "sub/blob.bin"}
    shutil.rmtree(eng.settings.entries_dir / entry.id)  # the work dir is gone
    after = {a.path: a for a in await eng.list_artifacts(ALICE, entry.id)}
    assert after == before  # sizes and sha256 as they were
    _, chunk = await eng.read_artifact(ALICE, entry.id, "table.csv")
    assert chunk.data == b"a,b\n1,2\n"
    _, part = await eng.read_artifact(ALICE, entry.id, "sub/blob.bin", 1000, 300)
    assert part.data == (bytes(range(256)) * 8)[1000:1300] and part.size == 256 * 8192
    with pytest.raises(NotFound):
        await eng.read_artifact(BOB, entry.id, "table.csv")
    with pytest.raises(NotFound) as exc:
        await eng.read_artifact(ALICE, entry.id, "missing.txt")
    assert exc.value.field == "path"


async def test_an_events_retention_ends_its_artifacts_and_others_stay(eng: Engine) -> None:
    short = await eng.create_event(ALICE, "short", retention_days=1)
    kept = await eng.create_event(ALICE, "kept")
    gone_entry = await eng.launch(ALICE, "writer", event_id=short.id)
    kept_entry = await eng.launch(ALICE, "writer", event_id=kept.id)
    for e in (gone_entry, kept_entry):
        await eng.wait_entry(ALICE, e.id, timeout_s=30)
    assert await eng.archive.sweep() == []  # not yet
    assert await eng.archive.sweep(time.time() + 2 * 86400) == [gone_entry.id]
    assert await eng.archive.manifest(gone_entry.id) is None
    assert await eng.storage.list(eng.storage.key("artifacts", gone_entry.id) + "/") == []
    assert await eng.archive.manifest(kept_entry.id) is not None
