"""Fuzzing the offload-format manifest: malformed, truncated and hostile manifests end in a MixtralOffloadError.

Never a crash, a hang, a huge allocation, or a read outside the checkpoint folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtral_offload_plugin import MixtralOffloadError, OffloadConfig, load_model
from mixtral_offload_plugin.cli import main
from mixtral_offload_plugin.storage.offload_format import MANIFEST_NAME, open_offload_checkpoint

# derandomize: CI runs the same examples every time (broader seeds are searched by hand: --hypothesis-seed=N)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                              st.text(max_size=12)),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def converted(tiny_mixtral, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "offload"
    assert main(["convert", str(tiny_mixtral), str(dst), "--expert-bits", "16", "--attn-bits", "16"]) == 0
    return dst


@pytest.fixture
def copy(converted, tmp_path_factory):
    def make(manifest: dict | bytes):
        d = tmp_path_factory.mktemp("m") / "offload"
        shutil.copytree(converted, d)
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        (d / MANIFEST_NAME).write_bytes(data)
        return d

    return make


def _open_and_load(d):
    try:
        open_offload_checkpoint(d).close()
        model = load_model(d, OffloadConfig(device="cpu", experts_per_layer=1, store="disk",
                                            max_memory_bytes=1 << 30))
    except MixtralOffloadError:
        return False
    model.unload()
    return True


def _paths(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*path, i))
    yield path


def _set(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


def test_the_untouched_conversion_loads(converted, copy):
    assert _open_and_load(copy(json.loads((converted / MANIFEST_NAME).read_text())))


@FUZZ
@given(data=st.data())
def test_one_field_replaced_by_hostile_json(converted, copy, data):
    manifest = json.loads((converted / MANIFEST_NAME).read_text())
    paths = sorted(_paths(manifest), key=str)
    path = data.draw(st.sampled_from(paths))
    _open_and_load(copy(_set(manifest, path, data.draw(JSON))))


@FUZZ
@given(cut=st.integers(1, 4000), junk=st.binary(max_size=16))
def test_truncated_or_garbled_manifest_bytes(converted, copy, cut, junk):
    raw = (converted / MANIFEST_NAME).read_bytes()
    _open_and_load(copy(raw[: max(len(raw) - cut, 0)] + junk))


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "/etc/passwd", "sub/../../x.bin"])
def test_paths_escaping_the_folder_are_rejected(converted, copy, hostile):
    manifest = json.loads((converted / MANIFEST_NAME).read_text())
    text = json.dumps(manifest)
    first_file = next(p for p in _paths(manifest) if p and p[-1] == "file")
    d = copy(_set(manifest, first_file, hostile))
    assert text != json.dumps(_set(manifest, first_file, hostile))
    with pytest.raises(MixtralOffloadError, match=r"outside the checkpoint folder|relative file name"):
        open_offload_checkpoint(d)


@pytest.mark.parametrize("size", [2**40, 2**62])
def test_absurd_sizes_do_not_allocate(converted, copy, size):
    manifest = json.loads((converted / MANIFEST_NAME).read_text())
    for p in _paths(manifest):
        if p and p[-1] in ("nbytes", "size"):
            manifest = _set(manifest, p, size)
    assert not _open_and_load(copy(manifest))
