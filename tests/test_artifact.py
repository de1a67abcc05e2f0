"""Artifacts: save/load round trip, the manifest, refusal of damaged or incompatible artifacts,
and atomic writes that never leave partial folders or destroy what was there."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import tvm
from test_runtime import two_branch_graph

import mmcompile
from mmcompile import artifact
from mmcompile.artifact import ArtifactError

NAME = "model.mmc"


@pytest.fixture(scope="module")
def compiled():
    model = mmcompile.compile(two_branch_graph(), verify=False, schedule="parallel")  # stages
    yield model
    model.close()


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    """The pristine artifact; tests that damage one work on a copy (see ``copy``)."""
    return compiled.save(tmp_path_factory.mktemp("saved") / NAME)


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / NAME)


@pytest.fixture(scope="module")
def feeds(compiled):
    return compiled.signature.random_inputs(seed=3)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _edit_manifest(path, edit):
    manifest = _manifest(path)
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _library(path):
    """The first stage's library file."""
    return path / _manifest(path)["stages"][0]["files"]["library"]


def _stage_files(compiled):
    return sorted(["manifest.json"] + [f"{s.name}.so" for s in compiled.stages])


def _leftovers(parent):
    """Hidden temporary folders ``write_artifact`` creates beside the destination."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{NAME}."))


def test_save_load_round_trip(compiled, saved, feeds):
    loaded = mmcompile.load(saved)
    assert loaded.signature == compiled.signature
    assert loaded.target == "cpu"
    assert [(s.name, s.inputs, s.outputs, s.depends_on) for s in loaded.stages] == \
        [(s.name, s.inputs, s.outputs, s.depends_on) for s in compiled.stages]
    assert (loaded.schedule.kind, loaded.schedule.workers) == \
        (compiled.schedule.kind, compiled.schedule.workers)
    assert loaded.metadata["pipeline"] == compiled.metadata["pipeline"]
    expected = compiled.run(feeds)
    got = loaded.run(feeds)
    for name in compiled.output_names:
        np.testing.assert_array_equal(got[name], expected[name])


def test_load_with_other_schedule(compiled, saved, feeds):
    expected = compiled.run(feeds)
    for kind in ("parallel", "sequential"):
        loaded = mmcompile.load(saved, schedule=kind)
        assert loaded.schedule.kind == kind
        got = loaded.run(feeds)
        for name in compiled.output_names:
            np.testing.assert_array_equal(got[name], expected[name])
        loaded.close()


def test_manifest_records_versions_signature_and_hashes(compiled, saved):
    manifest = _manifest(saved)
    assert manifest["format"] == "mmcompile-artifact"
    assert manifest["format_version"] == artifact.FORMAT_VERSION == 1
    assert manifest["versions"]["mmcompile"] == mmcompile.__version__
    assert manifest["versions"]["tvm"] == tvm.__version__
    assert manifest["target"] == "cpu"
    inputs = {i["name"]: i for i in manifest["signature"]["inputs"]}
    assert inputs["pixel_values"]["modality"] == "image"
    assert inputs["pixel_values"]["shape"] == [1, 3, 8, 8]
    assert (inputs["input_ids"]["modality"], inputs["input_ids"]["index_bound"]) == ("text", 10)
    assert [o["name"] for o in manifest["signature"]["outputs"]] == ["logits", "features"]
    assert [s["name"] for s in manifest["stages"]] == [s.name for s in compiled.stages]
    for stage in manifest["stages"]:
        assert stage["target"] == "cpu"
        assert set(stage["files"]) == set(stage["sha256"]) == {"library"}
        library = saved / stage["files"]["library"]
        assert stage["sha256"]["library"] == hashlib.sha256(library.read_bytes()).hexdigest()
    assert manifest["schedule"]["kind"] == compiled.schedule.kind
    assert sorted(p.name for p in saved.iterdir()) == _stage_files(compiled)


def _flip_byte(path):
    library = _library(path)
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))


def _truncate(path):
    library = _library(path)
    library.write_bytes(library.read_bytes()[:4096])


DAMAGE = {
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "manifest not JSON": (lambda p: (p / "manifest.json").write_text('{"format": "mmc'),
                          "manifest.json is corrupt"),
    "other format version": (lambda p: _edit_manifest(p, lambda m: m.update(format_version=99)),
                             "artifact format version 99; this mmcompile reads versions 1, 2"),
    "tampered library": (_flip_byte, ".so does not match its SHA-256"),
    "truncated library": (_truncate, ".so does not match its SHA-256"),
    "missing library": (lambda p: _library(p).unlink(), ".so is missing"),
    "other TVM major.minor": (
        lambda p: _edit_manifest(p, lambda m: m["versions"].update(tvm="0.26.0")),
        f"built with TVM 0.26.0, this is TVM {tvm.__version__}: recompile"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_load_refuses_damaged_artifact(copy, damage):
    corrupt, message = DAMAGE[damage]
    corrupt(copy)
    with pytest.raises(ArtifactError) as info:
        mmcompile.load(copy)
    assert message in str(info.value)
    assert str(copy) in str(info.value)


def test_load_accepts_other_tvm_patch_release(copy, compiled, feeds):
    _edit_manifest(copy, lambda m: m["versions"].update(tvm=tvm.__version__.split(".post")[0]
                                                        + ".99"))
    loaded = mmcompile.load(copy)
    np.testing.assert_array_equal(loaded.run(feeds)["logits"], compiled.run(feeds)["logits"])


def test_load_refuses_manifest_with_malformed_stage(copy):
    _edit_manifest(copy, lambda m: m["stages"][0].pop("sha256"))
    with pytest.raises(ArtifactError, match="manifest"):
        mmcompile.load(copy)


def test_save_replaces_existing_artifact(compiled, copy, feeds):
    (copy / "stale.txt").write_text("left by an older save")
    before = _manifest(copy)
    _edit_manifest(copy, lambda m: m.update(created="1970-01-01T00:00:00Z"))
    assert compiled.save(copy) == copy
    assert sorted(p.name for p in copy.iterdir()) == _stage_files(compiled)
    assert _manifest(copy)["created"] != "1970-01-01T00:00:00Z"
    assert _manifest(copy)["stages"][0]["sha256"] == before["stages"][0]["sha256"]
    assert _leftovers(copy.parent) == []
    mmcompile.load(copy).run(feeds)


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_save_refuses_to_overwrite_non_artifact(compiled, tmp_path, kind):
    dest = tmp_path / NAME
    if kind == "directory":
        dest.mkdir()
        (dest / "notes.txt").write_text("precious")
    else:
        dest.write_text("precious")
    with pytest.raises(ArtifactError, match="exists and is not an mmcompile artifact"):
        compiled.save(dest)
    if kind == "directory":
        assert [p.name for p in dest.iterdir()] == ["notes.txt"]
        assert (dest / "notes.txt").read_text() == "precious"
    else:
        assert dest.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]


def _failing_save(error):
    def save(directory, stem):
        (directory / f"{stem}.so").write_bytes(b"half a library")
        raise error
    return save


@pytest.mark.parametrize("error, raised", [(OSError("No space left on device"), ArtifactError),
                                           (RuntimeError("export_library failed"), RuntimeError)])
def test_failing_save_leaves_nothing_behind(compiled, tmp_path, monkeypatch, error, raised):
    monkeypatch.setattr(compiled.stages[-1].executable, "save", _failing_save(error))
    with pytest.raises(raised, match=str(error)):
        compiled.save(tmp_path / NAME)
    assert list(tmp_path.iterdir()) == []


def test_failing_save_keeps_existing_artifact(compiled, copy, monkeypatch, feeds):
    manifest = (copy / "manifest.json").read_bytes()
    monkeypatch.setattr(compiled.stages[-1].executable, "save",
                        _failing_save(OSError("No space left on device")))
    with pytest.raises(ArtifactError, match="cannot write artifact"):
        compiled.save(copy)
    assert (copy / "manifest.json").read_bytes() == manifest
    assert _leftovers(copy.parent) == []
    mmcompile.load(copy).run(feeds)


def test_failing_final_rename_keeps_existing_artifact(compiled, copy, monkeypatch):
    manifest = (copy / "manifest.json").read_bytes()
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # old artifact moved aside; now the new one fails to move in
            raise OSError("simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", replace)
    with pytest.raises(ArtifactError, match="simulated rename failure"):
        compiled.save(copy)
    monkeypatch.undo()
    assert (copy / "manifest.json").read_bytes() == manifest
    assert _leftovers(copy.parent) == []


def test_loaded_model_can_be_saved_again(saved, tmp_path, feeds):
    loaded = mmcompile.load(saved)
    again = mmcompile.load(loaded.save(tmp_path / NAME))
    np.testing.assert_array_equal(again.run(feeds)["logits"], loaded.run(feeds)["logits"])
