"""The spool and the receive handler: durable placement, duplicates, write failures, crash recovery."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from support.node import compiled_statements, write_series

from dicom_io.net import Peer, ReceivedInstance
from plugin.config import Config
from plugin.ingest.receive import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    PeerFilter,
    Receiver,
    make_spool,
)
from plugin.ingest.spool import SETTLE_BATCH, InvalidUID, check_uid
from plugin.node import Node
from plugin.store.engine import Store
from plugin.store.models import Reception, utcnow

PEER = Peer(ae_title="SCU", address="127.0.0.1", port=40000, association_id="1")


def _received(config: Config, source: Path, name: str = "tmp-1") -> ReceivedInstance:
    """What the transport hands over: a temporary copy in the incoming directory."""
    temp = config.incoming_dir / name
    shutil.copyfile(source, temp)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return ReceivedInstance(
        path=temp,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        peer=PEER,
        size=temp.stat().st_size,
    )


def _final(config: Config, inst: ReceivedInstance) -> Path:
    return config.spool_dir / inst.study_uid / inst.series_uid / f"{inst.sop_instance_uid}.dcm"


def test_uids_must_be_safe_file_names() -> None:
    assert check_uid("1.2.840.10008") == "1.2.840.10008"
    for bad in ["..", "1..2", "1.2/3", "../1", "", "1." * 40 + "1"]:
        with pytest.raises(InvalidUID):
            check_uid(bad)


def test_an_instance_is_spooled_recorded_and_its_temp_file_removed(
    config: Config, store: Store, tmp_path: Path
) -> None:
    [source] = write_series(tmp_path / "src", 1)
    inst = _received(config, source)
    assert Receiver(config).handle(inst) == STATUS_SUCCESS
    assert not inst.path.exists()
    assert _final(config, inst).read_bytes() == source.read_bytes()
    [study] = store.studies()
    assert (study.study_uid, study.instance_count, study.state) == (inst.study_uid, 1, "RECEIVING")


def test_the_same_instance_twice_is_stored_once_and_the_first_copy_kept(
    config: Config, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plugin.ingest.receive")
    [source] = write_series(tmp_path / "src", 1)
    receiver = Receiver(config)
    first = _received(config, source, "tmp-1")
    assert receiver.handle(first) == STATUS_SUCCESS
    original = _final(config, first).read_bytes()
    assert receiver.handle(_received(config, source, "tmp-2")) == STATUS_SUCCESS
    assert "received again; kept the stored copy" in caplog.text
    assert "other content" not in caplog.text
    changed = pydicom.dcmread(source)
    changed.InstanceNumber = 99
    changed.save_as(tmp_path / "changed.dcm")
    second = _received(config, tmp_path / "changed.dcm", "tmp-3")
    assert receiver.handle(second) == STATUS_SUCCESS
    assert "received again with other content; kept the first" in caplog.text
    assert not second.path.exists()
    assert _final(config, first).read_bytes() == original
    assert store.studies()[0].instance_count == 1


def test_a_write_failure_answers_out_of_resources_and_cleans_up(
    config: Config,
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    [source] = write_series(tmp_path / "src", 1)
    inst = _received(config, source)

    def disk_full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "link", disk_full)
    assert Receiver(config).handle(inst) == STATUS_OUT_OF_RESOURCES
    assert not inst.path.exists()
    assert not _final(config, inst).exists()
    assert store.studies() == []
    [line] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "No space left on device" in line.getMessage() and inst.sop_instance_uid in line.getMessage()


def test_a_study_directory_that_cannot_be_created_answers_out_of_resources(
    config: Config, store: Store, tmp_path: Path
) -> None:
    [source] = write_series(tmp_path / "src", 1)
    inst = _received(config, source)
    (config.spool_dir / inst.study_uid).write_bytes(b"not a directory")
    assert Receiver(config).handle(inst) == STATUS_OUT_OF_RESOURCES
    assert not inst.path.exists()


def test_a_database_failure_answers_out_of_resources(config: Config, tmp_path: Path) -> None:
    make_spool(config).prepare()
    config.data_dir.joinpath("radgate.db").mkdir()  # the database cannot be opened
    [source] = write_series(tmp_path / "src", 1)
    inst = _received(config, source)
    assert Receiver(config).handle(inst) == STATUS_OUT_OF_RESOURCES
    assert not inst.path.exists()


@pytest.mark.parametrize("content", [b"", b"not dicom at all"])
def test_a_file_that_is_not_dicom_is_refused(  # the transport checks structure; this is a backstop
    config: Config, store: Store, content: bytes
) -> None:
    temp = config.incoming_dir / "tmp-bad"
    temp.write_bytes(content)
    inst = ReceivedInstance(
        temp,
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1",
        PEER,
        len(content),
    )
    assert Receiver(config).handle(inst) in (STATUS_CANNOT_UNDERSTAND,)
    assert not temp.exists()
    assert store.studies() == []


def test_a_receiver_can_be_pickled_for_spawned_receiving_processes(
    config: Config, store: Store, tmp_path: Path
) -> None:
    receiver = Receiver(config)
    clone = pickle.loads(pickle.dumps(receiver))
    assert clone.association_key(PEER) == receiver.association_key(PEER)
    [source] = write_series(tmp_path / "src", 1)
    assert clone.handle(_received(config, source)) == STATUS_SUCCESS


def test_the_node_prepares_its_receiving_processes_so_the_first_instance_compiles_nothing(
    config: Config, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`radgate serve` gives the transport the receiver's `prepare`, which each receiving process
    runs on its copy of the receiver before it takes an association."""
    node = Node(config)
    try:
        assert node.scp is not None and node.scp.handlers.prepare == node.receiver.prepare
    finally:
        node.store.dispose()
    receiver = pickle.loads(pickle.dumps(node.receiver))  # what a receiving process gets
    receiver.prepare()
    compiled = compiled_statements(monkeypatch)
    [source] = write_series(tmp_path / "src", 1)
    assert receiver.handle(_received(config, source)) == STATUS_SUCCESS
    assert compiled == []
    receiver.close()


def test_peer_filter() -> None:
    from plugin.config import AllowedPeer

    assert PeerFilter([])(PEER)
    only_pacs = PeerFilter([AllowedPeer(ae_title="PACS", address="10.0.0.0/8")])
    assert not only_pacs(PEER)
    assert only_pacs(Peer("PACS", "10.1.2.3", 104, "2"))
    assert not only_pacs(Peer("PACS", "127.0.0.1", 104, "3"))


def test_recovery_removes_temp_files_rerecords_and_quarantines(
    config: Config, store: Store, tmp_path: Path
) -> None:
    spool = make_spool(config)
    (config.incoming_dir / "half-received").write_bytes(b"partial")
    # a crash after the link but before the commit: a complete spool file the store does not know
    [source, other, cut_source] = write_series(tmp_path / "src", 3)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    orphan = config.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    orphan.parent.mkdir(parents=True)
    shutil.copyfile(source, orphan)
    misplaced = orphan.parent / "1.2.3.dcm"  # its UIDs say it belongs elsewhere
    shutil.copyfile(other, misplaced)
    junk = orphan.parent / "junk.dcm"
    junk.write_bytes(b"garbage")
    # a power cut between link and fsync: the name is there, its pixel data only in part
    cut_ds = pydicom.dcmread(cut_source, stop_before_pixels=True)
    cut = orphan.parent / f"{cut_ds.SOPInstanceUID}.dcm"
    cut.write_bytes(cut_source.read_bytes()[:-100])

    report = spool.recover(store)

    assert (report.temp_removed, report.rerecorded, report.quarantined) == (1, 1, 3)
    assert list(config.incoming_dir.iterdir()) == []
    assert orphan.exists() and not misplaced.exists() and not junk.exists() and not cut.exists()
    quarantined = sorted(p.name for p in config.quarantine_dir.rglob("*.dcm"))
    assert quarantined == sorted(["1.2.3.dcm", "junk.dcm", cut.name])
    [study] = store.studies()
    assert study.instance_count == 1
    assert spool.recover(store).rerecorded == 0  # idempotent


def _incoming_file(config: Config, source: Path, name: str, complete: bool) -> Path:
    """An incoming file as the transport leaves it: write-only while its dataset arrives."""
    path = config.incoming_dir / name
    shutil.copyfile(source, path)
    path.chmod(0o644 if complete else 0o200)
    return path


def test_recovery_puts_back_a_complete_incoming_file_whose_final_name_was_lost(
    config: Config, store: Store, tmp_path: Path
) -> None:
    # a power cut after the answer but before `settle` synced the directory: the final name is gone,
    # the durable incoming name still holds the fsync'd file
    [acknowledged, arriving] = write_series(tmp_path / "src", 2)
    kept = _incoming_file(config, acknowledged, ".rx-w0.1-7.dcm", complete=True)
    cut_off = _incoming_file(config, arriving, ".rx-w0.1-8.dcm", complete=False)  # whole bytes, no mark
    made_ahead = config.incoming_dir / ".rx-w0.1-9.dcm"
    made_ahead.touch(mode=0o200)

    report = make_spool(config).recover(store)

    assert (report.adopted, report.temp_removed, report.rerecorded) == (1, 3, 1)
    assert list(config.incoming_dir.iterdir()) == []
    ds = pydicom.dcmread(acknowledged, stop_before_pixels=True)
    final = config.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert final.read_bytes() == acknowledged.read_bytes()
    assert store.recorded_paths(ds.StudyInstanceUID) == {make_spool(config).relative(final)}
    assert not kept.exists() and not cut_off.exists()
    [study] = store.studies()
    assert study.instance_count == 1  # the cut-off one was never acknowledged: the sender sends it again


def test_recovery_leaves_a_final_name_that_reached_the_disk_as_it_is(
    config: Config, store: Store, tmp_path: Path
) -> None:
    [source] = write_series(tmp_path / "src", 1)
    inst = _received(config, source)
    assert Receiver(config).handle(inst) == STATUS_SUCCESS
    final = _final(config, inst)
    # the same SOP Instance UID with other bytes, complete in incoming: the stored copy wins
    stray = _incoming_file(config, source, ".rx-w0.1-3.dcm", complete=True)
    stray.write_bytes(source.read_bytes()[:-2] + b"\x01\x01")
    report = make_spool(config).recover(store)
    assert (report.adopted, report.temp_removed) == (0, 1)
    assert final.read_bytes() == source.read_bytes()
    assert not stray.exists()


def test_durable_incoming_names_are_kept_until_their_directories_are_synced(
    config: Config, store: Store, tmp_path: Path
) -> None:
    sources = write_series(tmp_path / "src", 3)
    receiver = Receiver(config)
    instances = []
    for number, source in enumerate(sources):
        inst = dataclasses.replace(_received(config, source, f"tmp-{number}"), durable_name=True)
        assert receiver.handle(inst) == STATUS_SUCCESS
        assert _final(config, inst).read_bytes() == source.read_bytes()
        instances.append(inst)
    assert all(inst.path.exists() for inst in instances)  # the final names' directory is not synced yet
    receiver.release(PEER)  # the association ended (aborted: `Peer.released` False): settle
    assert not any(inst.path.exists() for inst in instances)
    assert all(_final(config, inst).exists() for inst in instances)


def test_only_a_released_association_shortens_the_wait_of_its_studies(
    config: Config, store: Store, tmp_path: Path
) -> None:
    """An aborted sender may send again: its reception stays open, as after a crash."""
    receiver = Receiver(config)
    [source] = write_series(tmp_path / "src", 1)
    assert receiver.handle(_received(config, source)) == STATUS_SUCCESS
    receiver.release(PEER)
    with store.session() as s:
        assert s.scalars(select(Reception.released_at)).all() == [None]
    receiver.release(dataclasses.replace(PEER, released=True))
    with store.session() as s:
        assert s.scalars(select(Reception.released_at)).one() is not None
    receiver.close()


def test_settle_runs_by_itself_every_batch(config: Config, store: Store, tmp_path: Path) -> None:
    sources = write_series(tmp_path / "src", SETTLE_BATCH)
    receiver = Receiver(config)
    instances = [
        dataclasses.replace(_received(config, source, f"tmp-{n}"), durable_name=True)
        for n, source in enumerate(sources)
    ]
    for inst in instances[:-1]:
        assert receiver.handle(inst) == STATUS_SUCCESS
    assert all(inst.path.exists() for inst in instances[:-1])
    assert receiver.handle(instances[-1]) == STATUS_SUCCESS
    assert not any(inst.path.exists() for inst in instances)


def test_a_series_directory_removed_while_running_is_made_again(
    config: Config, store: Store, tmp_path: Path
) -> None:
    first, second = write_series(tmp_path / "src", 2)
    receiver = Receiver(config)
    inst = _received(config, first, "tmp-1")
    assert receiver.handle(inst) == STATUS_SUCCESS
    shutil.rmtree(config.spool_dir / inst.study_uid)
    again = _received(config, second, "tmp-2")
    assert receiver.handle(again) == STATUS_SUCCESS
    assert _final(config, again).read_bytes() == second.read_bytes()


def test_malformed_informative_attributes_do_not_refuse_an_instance(
    config: Config, store: Store, tmp_path: Path
) -> None:
    [source] = write_series(tmp_path / "src", 1)
    ds = pydicom.dcmread(source)
    ds.SeriesNumber = 19
    with pydicom.config.disable_value_validation():
        ds.AccessionNumber = "A" * 40
        ds.save_as(source)
    good = b"\x20\x00\x11\x00IS\x02\x0019"  # (0020,0011) IS "19", explicit VR little endian
    source.write_bytes(source.read_bytes().replace(good, good[:-1] + b"A"))  # "1A", as in badVR.dcm
    assert good[:-1] + b"A" in source.read_bytes()
    assert Receiver(config).handle(_received(config, source)) == STATUS_SUCCESS
    assert store.studies()[0].accession_number == "A" * 16


def test_recovery_identifies_a_file_by_the_walk_and_takes_missing_sop_uids_from_its_file_meta(
    config: Config, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`describe` identifies a file with the transport's walk (`inspect_part10`): the SOP Class and
    Instance UIDs come from the file meta when the dataset has none (as in the published J2K CT in
    testdata), and pydicom is asked only for the attributes the store records."""
    [source] = write_series(tmp_path / "src", 1)
    ds = pydicom.dcmread(source)
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    del ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(source)
    assert "SOPInstanceUID" not in pydicom.dcmread(source, stop_before_pixels=True)
    asked: list[object] = []
    dcmread = pydicom.dcmread

    def recorded_dcmread(*args: Any, **kwargs: Any) -> pydicom.Dataset:
        asked.append(kwargs.get("specific_tags"))
        return dcmread(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", recorded_dcmread)

    rec = make_spool(config).describe(source, utcnow())

    assert (rec.sop_class_uid, rec.sop_instance_uid) == (sop_class, sop_instance)
    assert rec.transfer_syntax == str(ds.file_meta.TransferSyntaxUID)
    assert rec.spool_path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{sop_instance}.dcm"
    assert rec.tags.modality == ds.Modality
    recorded = ["AccessionNumber", "Modality", "SeriesNumber", "PatientID", "PatientName", "StudyDate"]
    assert asked == [recorded]
