"""Provenance of results: package versions, the dirty flag, and artefacts read from another run (sha256 + producer)."""
import json

import numpy as np
import pytest

from eejax.errors import ArtefactError
from eejax.harness import results


def test_provenance_carries_versions_dirty_flag_and_an_inputs_list():
    prov = results.provenance("experiments.demo", ["--x=1"])
    assert prov.versions["jax"] == prov.jax_version and "python" in prov.versions and "numpy" in prov.versions
    assert prov.dirty == prov.commit.endswith("+dirty")
    assert prov.inputs == []
    assert set(prov._asdict()) >= {"command", "device", "commit", "dirty", "versions", "inputs", "date"}


def test_an_artefact_read_from_another_run_lands_in_the_result_json(tmp_path):
    producer = results.provenance("experiments.producer", [])
    art = tmp_path / "adapter_l2.npz"
    np.savez(art, w=np.arange(4.0))
    results.write_artefact_record(art, producer, step=200)

    consumer = results.provenance("experiments.consumer", [])
    rec = results.record_input(consumer, art, "drafter")
    assert rec.sha256 == results.sha256_of(art) and len(rec.sha256) == 64
    assert (rec.producer_commit, rec.producer_step) == (producer.commit, 200)
    assert rec.producer_command == producer.command
    assert "drafter" in consumer.markdown() and rec.sha256[:16] in consumer.markdown()

    files = results.write_results(tmp_path / "out", "demo", "# demo", {"provenance": consumer._asdict()})
    written = json.loads(files.json_path.read_text())["provenance"]["inputs"]
    assert written == [rec._asdict()]


def test_a_file_without_a_record_says_so_and_a_replaced_file_is_refused(tmp_path):
    prov = results.provenance("experiments.consumer", [])
    plain = tmp_path / "features.npz"
    np.savez(plain, x=np.zeros(3))
    rec = results.record_input(prov, plain, "features")
    assert rec.producer_commit == results.NOT_RECORDED and rec.producer_step is None

    results.write_artefact_record(plain, prov, step=1)
    np.savez(plain, x=np.ones(3))                  # replaced after its producer recorded it
    with pytest.raises(ArtefactError, match="features.npz"):
        results.record_input(prov, plain, "features")


def test_a_result_json_read_as_input_names_its_own_producer(tmp_path):
    """``read_result_input``: a committed result another run wrote is recorded with its sha256 and, as producer,
    the commit / command / date of its own provenance; the path is relative to the repository root when inside."""
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    src = repo / "results" / "run.json"
    src.write_text(json.dumps({"provenance": {"commit": "abc1234", "command": "python -m x", "date": "d"},
                               "rows": [1]}))
    prov = results.provenance("experiments.tool", [])
    data = results.read_result_input(prov, src, "the run", root=repo)
    assert data["rows"] == [1]
    (rec,) = prov.inputs
    assert (rec.path, rec.producer_commit, rec.producer_command) == ("results/run.json", "abc1234", "python -m x")
    assert rec.sha256 == results.sha256_of(src)
    other = tmp_path / "elsewhere.json"
    other.write_text("{}")
    results.read_result_input(prov, other, "no provenance", root=repo)
    assert prov.inputs[-1].path == str(other) and prov.inputs[-1].producer_commit == results.NOT_RECORDED


def test_directory_hash_changes_with_any_file(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_text("1")
    (d / "sub" / "b").write_text("2")
    h = results.sha256_of(d)
    assert h == results.sha256_of(d)
    (d / "sub" / "b").write_text("3")
    assert results.sha256_of(d) != h
