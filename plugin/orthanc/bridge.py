"""The Orthanc plugin's work, without Orthanc: copy a study into radgate, complete it, queue jobs.

An instance copied from Orthanc is checked as the transport checks one (`Receiver.handle_file`) and
handled by the same `plugin.ingest.receive.Receiver` as one received by C-STORE (fsync, link into
the spool, record, one row per SOP Instance UID), as one "association" per import that is
released at its end. Orthanc's stable-study event is the completion signal: the study revision
is declared complete and routed at once, in one transaction (the worker's quiet period is not
needed). A study whose import
brought nothing new stays as it is, so a stable event that fires twice queues one job.

Instances radgate itself sent into Orthanc (their SOP Instance UIDs are in the deliveries) are
not copied back; neither are instances already recorded, so a repeated import downloads nothing.

Routing here cannot check the rules against the installed pipelines (that needs ``ai_models``
and torch, which stay out of Orthanc's process); ``radgate worker`` checks them at its start, and
a job naming a pipeline that is not installed fails with the registry's message. The series each
pipeline wants (its `SeriesWanted` declaration, for study-scope rules and on-demand runs) is read
without importing the pipelines (`plugin.route.pipelines.series_lookup`, `import_pipelines=False`).

Crash safety: which of Orthanc's changes (``/changes``) were handled is kept in a small state
file in the data dir, written after each stable study and each page; at start the log is
replayed from there, so a study that became stable while the plugin was busy or down is still
imported. Replays are harmless (see above). A first start begins at Orthanc's latest change:
older studies are sent with the on-demand route.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select

from dicom_io.durable import fsync_dir
from dicom_io.net import Peer
from plugin.config import Config, ConfigError
from plugin.ingest.datadir import ORTHANC_PLUGIN, DataDirLock, apply_file_modes
from plugin.ingest.receive import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    Receiver,
    make_spool,
)
from plugin.jobs.queue import NoUsableSeries, list_jobs, queue_named_job, queue_routed_jobs
from plugin.route.pipelines import known_pipelines, named_pipelines, series_lookup
from plugin.route.rules import validate_rules
from plugin.store.engine import Store
from plugin.store.models import Delivery, Instance, Study, StudyState, utcnow
from plugin.store.queries import instance_counts

log = logging.getLogger(__name__)

PEER_AE = "ORTHANC-PLUGIN"
PAGE = 100
_QUERY_CHUNK = 500


class RestApi(Protocol):
    """Orthanc's REST API as the plugin sees it: GET a path, get the body, or an exception."""

    def get(self, path: str) -> bytes: ...


class ImportFailed(RuntimeError):
    """radgate could not take an instance (disk full, database down): try the study again later."""


def get_json(rest: RestApi, path: str) -> Any:
    return json.loads(rest.get(path))


@dataclass(frozen=True)
class Imported:
    """One study copied from Orthanc: instances stored now, already known, refused as unusable."""

    study_uid: str
    stored: int
    known: int
    refused: int


@dataclass(frozen=True)
class Submitted:
    """What a study's import and completion led to: the jobs queued (none: nothing new)."""

    imported: Imported
    jobs: tuple[int, ...]

    def as_json(self, orthanc_id: str) -> dict[str, Any]:
        i = self.imported
        return {
            "orthanc_study": orthanc_id,
            "study_uid": i.study_uid,
            "instances": {"stored": i.stored, "known": i.known, "refused": i.refused},
            "jobs": list(self.jobs),
        }


class ChangeCursor:
    """Where the plugin is in Orthanc's change log, in a file written atomically: the last change
    handled, the stable study now failing (and how often), and the studies set aside."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return state

    def _write(self, state: dict[str, Any]) -> None:
        temp = self.path.with_name(f".{self.path.name}.tmp")
        with open(temp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
        fsync_dir(self.path.parent)

    def load(self) -> int | None:
        last = self._read().get("last_change")
        return None if last is None else int(last)

    def save(self, seq: int) -> None:
        """The last change handled; a failure of an earlier change is over."""
        state = self._read()
        state["last_change"] = seq
        if state.get("failing", {}).get("seq", seq + 1) <= seq:
            del state["failing"]
        self._write(state)

    def failed(self, seq: int, orthanc_id: str) -> int:
        """Count one more failure of the stable study at change ``seq``; how many in a row."""
        state = self._read()
        failing = state.get("failing", {})
        attempts = int(failing.get("attempts", 0)) + 1 if failing.get("seq") == seq else 1
        state["failing"] = {"seq": seq, "orthanc_id": orthanc_id, "attempts": attempts}
        self._write(state)
        return attempts

    def set_aside(self, seq: int, orthanc_id: str, error: str) -> None:
        state = self._read()
        state.setdefault("set_aside", []).append(
            {"seq": seq, "orthanc_id": orthanc_id, "error": error[:500], "at": utcnow().isoformat()}
        )
        self._write(state)

    def set_aside_studies(self) -> list[dict[str, Any]]:
        """Stable studies given up after repeated failures, to run on demand once the cause is fixed."""
        return list(self._read().get("set_aside", []))


class Bridge:
    """Imports Orthanc studies into one radgate data dir and store and queues their jobs."""

    def __init__(
        self,
        config: Config,
        rest: RestApi,
        destinations: Sequence[str] | None = None,
        max_attempts: int = 5,
    ) -> None:
        for name in destinations or ():
            if name not in config.destinations:
                raise ConfigError(
                    f"Radgate.Destinations: {name!r} is not a destination in the radgate config"
                )
        self.config = config
        self.rest = rest
        named = named_pipelines(config)
        self.pipelines = known_pipelines(config)
        lookup = series_lookup(config, import_pipelines=False)
        self.rules = dataclasses.replace(validate_rules(config, named), series_lookup=lookup)
        self.destinations = tuple(config.destinations if destinations is None else destinations)
        self.store = Store(config.db_url)
        self.receiver = Receiver(config)
        self.lock = DataDirLock(config.data_dir, config.file_modes, ORTHANC_PLUGIN)  # one plugin per data dir
        self.cursor = ChangeCursor(config.data_dir / "orthanc-changes.json")
        self.max_attempts = max_attempts
        # temporary copies; not serve's incoming folder, which its start-up recovery empties
        self.incoming = config.data_dir / "incoming-orthanc"
        self._imports = itertools.count(1)

    def check_pipeline(self, name: str) -> str:
        """A pipeline name from an HTTP request: itself, or `ValueError` naming the known ones."""
        if name not in self.pipelines:
            known = ", ".join(sorted(self.pipelines)) or "none"
            raise ValueError(f"unknown pipeline {name[:80]!r}; known pipelines: {known}")
        return name

    def prepare(self) -> None:
        """The data dir's plugin lock (DataDirBusy, nothing touched, while another Orthanc's plugin
        holds it; a `radgate serve` on the data dir is fine: it has its own incoming folder), private
        file modes for this process (Orthanc's: `plugin.ingest.datadir`), the schema, spool folders, and no
        temporary file left from a copy a crash interrupted."""
        apply_file_modes(self.config.file_modes)
        self.lock.acquire()
        self.store.migrate()
        make_spool(self.config).prepare()
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.receiver.close()
        self.store.dispose()
        self.lock.release()

    # ------------------------------------------------------------------ import

    def study_uid(self, orthanc_id: str) -> str:
        return str(get_json(self.rest, f"/studies/{orthanc_id}")["MainDicomTags"]["StudyInstanceUID"])

    def known_sop_uids(self, uids: Iterable[str]) -> set[str]:
        """The SOP Instance UIDs radgate already has: recorded instances and results it sent."""
        wanted = list(uids)
        known: set[str] = set()
        with self.store.session() as s:
            for start in range(0, len(wanted), _QUERY_CHUNK):
                chunk = wanted[start : start + _QUERY_CHUNK]
                known.update(
                    s.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk)))
                )
                known.update(
                    s.scalars(select(Delivery.sop_instance_uid).where(Delivery.sop_instance_uid.in_(chunk)))
                )
        return known

    def _take(self, instance_id: str, peer: Peer) -> int | None:
        """Copy one instance's file into a temporary file and store it as a received one
        (`Receiver.handle_file`): its status, None when it is not a storable instance. Raises
        OSError when the file cannot be written or read."""
        path = self.incoming / f"{instance_id}.dcm"
        path.write_bytes(self.rest.get(f"/instances/{instance_id}/file"))
        return self.receiver.handle_file(path, peer, f"orthanc instance {instance_id}")

    def import_study(self, orthanc_id: str, stop: Callable[[], bool] = lambda: False) -> Imported:
        """Copy the study's instances radgate does not have yet; ImportFailed if radgate cannot take one."""
        study_uid = self.study_uid(orthanc_id)
        instances = get_json(self.rest, f"/studies/{orthanc_id}/instances")
        by_uid = {str(i["MainDicomTags"]["SOPInstanceUID"]): str(i["ID"]) for i in instances}
        known = self.known_sop_uids(by_uid)
        peer = Peer(PEER_AE, "orthanc-plugin", 0, f"orthanc-import-{next(self._imports)}")
        stored = refused = 0
        done = False
        try:
            for sop_uid, instance_id in by_uid.items():
                if sop_uid in known:
                    continue
                if stop():
                    raise ImportFailed("stopping")
                status = self._take(instance_id, peer)
                if status == STATUS_OUT_OF_RESOURCES:
                    raise ImportFailed(f"radgate could not store SOP {sop_uid} of study {study_uid}")
                if status == STATUS_SUCCESS:
                    stored += 1
                else:
                    refused += 1
            done = True
        finally:  # an import cut short is tried again: ended as an aborted association would be
            self.receiver.release(dataclasses.replace(peer, released=done))
        return Imported(study_uid, stored, len(known), refused)

    # ------------------------------------------------------------------ completion and jobs

    def complete(self, study_uid: str, pipeline: str | None = None, force: bool = False) -> tuple[int, ...]:
        """Declare the study's current revision complete and queue its jobs, in one transaction.

        Not ``force``: only a RECEIVING revision (new instances) is completed and routed. ``force``
        (on demand): queue again even if complete; ``pipeline`` bypasses the rules and runs on the
        series that pipeline prefers (no job when it can use none: the log says why).
        """
        with self.store.session() as s:
            study = s.scalars(
                select(Study).where(Study.study_uid == study_uid).with_for_update()
            ).one_or_none()
            if study is None:  # e.g. only results radgate sent: nothing to complete
                if force:
                    raise LookupError(f"study {study_uid} has no instances radgate can use")
                return ()
            if study.state == StudyState.RECEIVING:
                study.state = StudyState.COMPLETE
                study.completed_at = utcnow()
                log.info(
                    "study %s revision %d complete (Orthanc): %d instances",
                    *(study.study_uid, study.revision, instance_counts(s, [study.id]).get(study.id, 0)),
                )
            elif not force:
                return ()
            if pipeline is not None:
                try:
                    jobs = [
                        queue_named_job(
                            s, study, pipeline, self.rules, self.config.spool_dir, self.destinations
                        )
                    ]
                except NoUsableSeries as err:
                    log.info(
                        "study %s revision %d: not run on demand: %s", study.study_uid, study.revision, err
                    )
                    jobs = []
            else:
                jobs = queue_routed_jobs(s, study, self.rules, self.config.spool_dir)
            return tuple(job.id for job in jobs)

    def submit(
        self,
        orthanc_id: str,
        pipeline: str | None = None,
        force: bool = False,
        stop: Callable[[], bool] = lambda: False,
    ) -> Submitted:
        """Import an Orthanc study, then complete it and queue its jobs (see `complete`)."""
        imported = self.import_study(orthanc_id, stop)
        if imported.stored == 0 and imported.known == 0:  # nothing usable: nothing to run
            log.info("orthanc study %s (%s): no usable instance", orthanc_id, imported.study_uid)
            return Submitted(imported, ())
        jobs = self.complete(imported.study_uid, pipeline, force)
        log.info(
            "orthanc study %s (%s): %d instances stored, %d known, %d refused; jobs %s",
            *(orthanc_id, imported.study_uid, imported.stored, imported.known, imported.refused),
            list(jobs) or "none",
        )
        return Submitted(imported, jobs)

    def jobs(self) -> list[dict[str, Any]]:
        return list_jobs(self.store, self.config.results_dir)

    # ------------------------------------------------------------------ Orthanc's change log

    def _study_gone(self, orthanc_id: str) -> bool:
        try:
            self.rest.get(f"/studies/{orthanc_id}")
        except Exception:  # the SDK raises one exception type for every error answer
            return True
        return False

    def _stable_study(self, orthanc_id: str, stop: Callable[[], bool]) -> None:
        try:
            self.submit(orthanc_id, stop=stop)
        except ImportFailed:
            raise
        except Exception:
            if not self._study_gone(orthanc_id):
                raise
            log.info("orthanc study %s was deleted before radgate took it", orthanc_id)

    def _take_or_set_aside(self, seq: int, orthanc_id: str, stop: Callable[[], bool]) -> None:
        """Import one stable study; an error is raised to be tried again later, except the
        ``max_attempts``-th unexpected one in a row, which sets the study aside so that one study
        cannot hold up all those after it. `ImportFailed` (radgate could not store: a full disk, a
        database down) is never set aside: every study waits for the cause to go away."""
        try:
            self._stable_study(orthanc_id, stop)
        except ImportFailed:
            raise
        except Exception as err:
            if stop():
                raise
            attempts = self.cursor.failed(seq, orthanc_id)
            if attempts < self.max_attempts:
                raise
            reason = f"{type(err).__name__}: {err}"
            self.cursor.set_aside(seq, orthanc_id, reason)
            log.error(
                "orthanc study %s failed %d times (last: %s); set aside so that the studies after it are "
                "taken; once the cause is fixed, run it with POST /radgate/studies/%s/run",
                *(orthanc_id, attempts, reason, orthanc_id),
            )

    def follow_changes(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Handle every stable study in Orthanc's change log since the cursor; returns how many.

        An error leaves the cursor before the study that failed, so the next call tries it again
        (see `_take_or_set_aside` for a study that keeps failing).
        """
        since = self.cursor.load()
        if since is None:
            since = int(get_json(self.rest, "/changes?last")["Last"])
            self.cursor.save(since)
            log.info("following Orthanc's changes from %d (first start)", since)
        handled = 0
        while not stop():
            page = get_json(self.rest, f"/changes?since={since}&limit={PAGE}")
            if since > int(page["Last"]):
                log.warning(
                    "Orthanc's change log restarted (last %s < %d): reading it again", page["Last"], since
                )
                since = 0
                self.cursor.save(since)
                continue
            for change in page["Changes"]:
                stable = change["ChangeType"] == "StableStudy"
                if stable:
                    self._take_or_set_aside(int(change["Seq"]), str(change["ID"]), stop)
                    handled += 1
                since = int(change["Seq"])
                if stable:
                    self.cursor.save(since)
            if page["Changes"]:
                self.cursor.save(since)
            if page["Done"]:
                break
        return handled
