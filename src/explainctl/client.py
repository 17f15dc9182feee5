"""The client library behind the CLI: submit, follow, read, cancel and retry jobs."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

from explainctl.config import Settings
from explainctl.inputs import InputItem
from explainctl.io.s3 import S3Settings
from explainctl.io.sources import read_uri
from explainctl.io.storage import Storage, open_storage
from explainctl.io.uri import parse_uri, redacted
from explainctl.jobs import leases
from explainctl.jobs.manifest import read_manifest, write_job_json, write_manifest
from explainctl.jobs.queue import make_app, send_items, waiting_chunks, warn_exposure
from explainctl.jobs.reconcile import reconcile
from explainctl.jobs.records import derived, item_records, own_file
from explainctl.jobs.signing import SigningKeys
from explainctl.jobs.store import JobStatus, JobStore, redis_errors
from explainctl.pages.report import Gallery, build_report
from explainctl.spec.contracts import (
    ARTIFACT_NAMES,
    DEFAULT_CHUNK_SIZE,
    FINISHED_JOB_STATES,
    ITEM_NAME,
    REPORT_HTML,
    STAGED_INPUTS,
    ChunkItem,
    JobInfo,
    JobState,
    ModelSpec,
    image_kind,
    is_source_id,
    item_name,
    job_key,
)
from explainctl.spec.errors import (
    ExplainctlError,
    InvalidInput,
    ItemError,
    JobNotFound,
    ServiceUnavailable,
)
from explainctl.spec.ids import check_job_id, new_job_id
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import ItemRecord

ARTIFACT_MAX_BYTES = 512 * 1024 * 1024
log = logging.getLogger("explainctl.client")


@dataclass(frozen=True)
class Submitted:
    job_id: str
    total: int
    chunks: int
    output: str


@dataclass(frozen=True)
class Cancelled:
    count: int  # queued items cancelled
    finished: JobState | None = None  # the state of a job that had already finished


def _chunks(items: Iterable[ChunkItem], size: int) -> Iterator[list[ChunkItem]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass(frozen=True)
class _Records:
    """A job's item records, streamed from the start each time they are iterated."""

    client: Client
    job_id: str

    def __iter__(self) -> Iterator[ItemRecord]:
        return iter(self.client.results(self.job_id))


def _open_folder(top: int, name: str, directory: str) -> int:
    """The folder `name` in the directory open as `top`, made if missing; refused if it is
    a symlink or anything but a folder."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_fd=top)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
    except OSError:
        raise InvalidInput(
            f"refusing to write into {os.path.join(directory, name)}: not a plain folder "
            "(a symlink?)"
        ) from None


def _write_in(folder: int, filename: str, data: bytes) -> None:
    """Write `filename` in the folder open as `folder` as a new file renamed over whatever
    was there, so a symlink or hard link planted at that name is replaced, never written
    through."""
    temporary = f".{filename}.{secrets.token_hex(6)}.part"
    handle = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder
    )
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, filename, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=folder)
        raise


class Client:
    """The library behind the CLI's job commands. `settings` name the broker and output;
    `explainctl.local.embedded.resolve` fills them in for one machine."""

    def __init__(self, settings: Settings):
        if not settings.broker_url or not settings.output:
            raise InvalidInput("no broker or output configured (embedded.resolve fills them)")
        self.settings = settings
        warn_exposure(settings.broker_url, lambda line: log.warning("warning: %s", line))

    @cached_property
    def store(self) -> JobStore:
        store = JobStore.connect(self.settings.broker_url, job_ttl=self.settings.job_ttl,
                                 keys=SigningKeys(self.settings.signing_secrets()))  # fmt: skip
        store.ping()
        store.check_server()  # its warnings are the workers' to log: they run for hours
        return store

    @cached_property
    def app(self):
        return make_app(self.settings)

    def storage(self, root: str | None = None) -> Storage:
        return open_storage(root or self.settings.output, s3_settings=S3Settings.of(self.settings))

    # --- submitting -------------------------------------------------------------------

    def submit(
        self,
        inputs: Iterable[InputItem],
        model: ModelSpec,
        params: ExplainParams,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        labels: tuple[str, ...] | None = None,
    ) -> Submitted:
        """Queue a job, streaming: one Redis pipeline and one message per chunk of items.
        `labels` name the model's classes (explainctl.labels)."""
        if chunk_size < 1:
            raise InvalidInput("--chunk-size must be at least 1")
        iterator = iter(inputs)
        first = next(iterator, None)
        if first is None:
            raise InvalidInput("no images found in the inputs")
        output = self._absolute_output(self.settings.output)
        info = JobInfo(
            job_id=new_job_id(),
            created=time.time(),
            model=model,
            params=params,
            output=output,
            queue=self.settings.queue,
            chunk_size=chunk_size,
            labels=labels,
        )
        try:
            write_job_json(self.storage(output), info)
        except ItemError as error:
            raise ServiceUnavailable(f"cannot write to {output}: {error.message}") from None
        token = secrets.token_hex(8)
        self.store.create(info, submitter=token)
        return self._queue(info, itertools.chain([first], iterator), 0, 0, token)

    def resume(self, job_id: str, inputs: Iterable[InputItem]) -> Submitted:
        """Finish queueing an interrupted job from the same inputs: chunks recorded but
        not sent are sent, then the items after the last recorded one are queued. No item
        is queued twice; inputs that differ from the first submit are refused."""
        status = self.store.status(check_job_id(job_id))
        if status.state != "interrupted":
            raise InvalidInput(f"job {job_id} is {status.state}; only an interrupted job resumes")
        info = self.store.verified_info(job_id)  # what the chunks sent from now carry
        token = secrets.token_hex(8)
        if not self.store.claim_submitter(job_id, token):
            raise InvalidInput(f"job {job_id} is being queued by another submit")
        recorded, chunks, sent = self.store.progress(job_id)
        size = info.chunk_size
        iterator = iter(inputs)
        # The records hold redacted URIs (io.uri.redacted): the inputs are matched on that
        # form, and the chunks recorded but not sent go with the URIs as given, so a
        # presigned input keeps its signature in the message.
        # Their URIs only: a dataset row's item holds its image's bytes.
        skipped = [item.uri for item in itertools.islice(iterator, recorded)]
        first_unsent = sent * size
        held = self.store.chunk_items(job_id, first_unsent, recorded)
        if held.tampered:  # not sent: the submission goes on without them
            self.store.fail_tampered(job_id, held.tampered)
            log.error("job %s: %d recorded items have records that do not verify against the "
                      "signing keys: failed as record-tampered, not sent", job_id,
                      len(held.tampered))  # fmt: skip
        checked = held.items or (
            self.store.chunk_items(job_id, recorded - 1, recorded).items if recorded else []
        )
        if len(skipped) < recorded or any(
            redacted(skipped[item.index]) != item.uri for item in checked
        ):
            self.store.release_submitter(job_id)
            raise InvalidInput(
                f"these inputs are not the ones job {job_id} was submitted with "
                f"(its items from {first_unsent} differ or are missing)"
            )
        for number in range(sent, chunks):
            items = [
                item.model_copy(update={"uri": skipped[item.index]})
                for item in held.items
                if number * size <= item.index < (number + 1) * size
            ]
            if items and not self._was_sent(info, number, items):
                self._send(info, items, number)
            self.store.mark_sent(job_id, number + 1)
        return self._queue(info, iterator, recorded, chunks, token)

    def _was_sent(self, info: JobInfo, number: int, items: list[ChunkItem]) -> bool:
        """Whether chunk `number`, recorded before its submit died, reached the queue:
        a worker took one of its items, or its message waits in the queue or is reserved."""
        states = self.store.states(info.job_id, [item.index for item in items])
        if any(state != "queued" for state in states):
            return True
        return any(
            payload.get("job_id") == info.job_id and payload.get("chunk") == number
            for payload in waiting_chunks(self.store.redis, info.queue)
        )

    def _queue(
        self, info: JobInfo, entries: Iterable[InputItem], first: int, chunks: int, token: str
    ) -> Submitted:
        """Record and send the items of `entries`, numbered from `first`, in chunks."""
        total = first
        renewed = time.monotonic()
        try:
            for batch in _chunks(enumerate(entries, start=first), info.chunk_size):
                chunk, failures = self._stage(info, batch)
                number = self.store.add_chunk(info.job_id, chunk)
                if failures:  # settled before the chunk is sent: no worker runs them
                    self.store.settle(info.job_id, failures)
                if refusal := self._send_or_fail(info, chunk, number):
                    raise refusal
                self.store.mark_sent(info.job_id, number + 1)
                total += len(chunk)
                chunks += 1
                if time.monotonic() - renewed > 2:
                    self.store.renew_submitter(info.job_id, token)
                    renewed = time.monotonic()
        except ExplainctlError as error:
            # What is queued stays queued and can finish; the job just ends where input did.
            with contextlib.suppress(ServiceUnavailable):
                if self.store.mark_submitted(info.job_id):  # every item had settled
                    write_manifest(self.store, self.storage(info.output), info.job_id)
            message = f"{error} (job {info.job_id} kept the {total} items queued before it)"
            kind = InvalidInput if isinstance(error, InvalidInput) else ServiceUnavailable
            raise kind(message) from None
        recorded, _, _ = self.store.progress(info.job_id)
        if recorded != total:
            # Redis acknowledged writes it then lost (a crash between fsyncs, a failover):
            # finishing now would end the job short of its inputs.
            self.store.release_submitter(info.job_id)
            raise ServiceUnavailable(
                f"Redis lost {total - recorded} of the {total} items of job {info.job_id} "
                "while they were queued (a crash or failover lost its last writes); the job "
                "is left interrupted: cancel it and submit again"
            )
        if self.store.mark_submitted(info.job_id):
            write_manifest(self.store, self.storage(info.output), info.job_id)
        return Submitted(info.job_id, total, chunks, info.output)

    def _stage(
        self, info: JobInfo, batch: list[tuple[int, InputItem]]
    ) -> tuple[list[ChunkItem], list[tuple[int, str, dict]]]:
        """The chunk's items, a dataset row's image bytes first written to the job's
        `inputs/` (workers read them there, under the same limits as any input), and the
        failures of rows that cannot be: no image, or over EXPLAINCTL_MAX_IMAGE_BYTES."""
        limit = self.settings.max_image_bytes
        items, failures, uploads = [], [], []
        for index, entry in batch:
            staged = None
            if entry.data is not None:
                size = len(entry.data)
                if size == 0:
                    failure = {"error_code": "empty", "error": "the dataset row has no image"}
                    failures.append((index, "failed", failure))
                elif size > limit:
                    message = f"the image is {size} bytes, above the limit of {limit}"
                    failures.append(
                        (index, "failed", {"error_code": "too-large", "error": message})
                    )
                else:
                    kind = image_kind(entry.data)
                    staged = f"{STAGED_INPUTS}/{item_name(index, entry.uri)}.{kind}"
                    media = "application/octet-stream" if kind == "bin" else f"image/{kind}"
                    uploads.append((job_key(info.job_id, staged), entry.data, media))
            items.append(ChunkItem(index=index, uri=entry.uri, target=entry.target,
                                   label=entry.label, staged=staged))  # fmt: skip
        if uploads:
            storage = self.storage(info.output)
            # One request per row: in threads, so a remote store's latency is paid once a chunk.
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="stage") as pool:
                for done in [pool.submit(storage.put, *upload) for upload in uploads]:
                    done.result()
        return items, failures

    @staticmethod
    def _absolute_output(output: str) -> str:
        location = parse_uri(output) if "://" in output else None
        if location is None or location.scheme == "file":
            # Workers on this machine may run in another directory: pin the path.
            return os.path.abspath(location.key if location else output)
        return output

    def _send_or_fail(
        self, info: JobInfo, items: list[ChunkItem], chunk: int, unsent: Sequence[ChunkItem] = ()
    ) -> ServiceUnavailable | None:
        """Send one chunk. If the broker refuses it, fail its items and `unsent` (recorded
        items this call will not send either) as not-queued and return the refusal: the
        job can then end instead of waiting for messages that never come (`retry` queues
        them again)."""
        try:
            self._send(info, items, chunk)
        except ServiceUnavailable as refusal:
            failure = {"error_code": "not-queued", "error": "the broker refused it"}
            changes = [(i.index, "failed", failure) for i in [*items, *unsent]]
            if self.store.settle(info.job_id, changes):  # failures only: nothing to store
                write_manifest(self.store, self.storage(info.output), info.job_id)
            return refusal
        return None

    def _send(self, info: JobInfo, items: list[ChunkItem], chunk: int) -> None:
        send_items(self.app, info, items, chunk)

    # --- reading ----------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        """From the live records, the sealed index entry, or job.json in storage."""
        try:
            return self.store.status(check_job_id(job_id))
        except JobNotFound:
            job, _ = read_manifest(self.storage(self._output_of(job_id)), job_id)
            return JobStatus.from_document(job)

    def _output_of(self, job_id: str) -> str:
        """Where a job's manifest is: its index entry says, else the configured output."""
        sealed = self.store.sealed(job_id)
        return sealed.info.output if sealed else self.settings.output

    def watch(self, job_id: str, interval: float = 1.0) -> Iterator[JobStatus]:
        """Statuses until the job settles; rides out Redis restarts by reconnecting. While
        it waits it also reaps lost chunks and items (jobs.leases, jobs.reconcile), so a
        job whose last worker died goes back to the queue for the next one."""
        check_job_id(job_id)
        outage_started = None
        looked = reaped = time.monotonic()
        seen = False
        while True:
            try:
                status = self.store.status(job_id)
            except ServiceUnavailable:
                outage_started = outage_started or time.monotonic()
                if time.monotonic() - outage_started > 300:
                    raise ServiceUnavailable("lost Redis for 5 minutes while waiting") from None
                time.sleep(interval)
                continue
            except JobNotFound:
                if not seen:
                    raise
                raise ServiceUnavailable(
                    f"job {job_id} vanished from Redis before it finished, with no manifest "
                    "(Redis lost its records: a restart without persistence, or a failover)"
                ) from None
            outage_started, seen = None, True
            yield status
            if status.state in FINISHED_JOB_STATES:
                return
            if time.monotonic() - reaped >= self.settings.lease_seconds / 2:
                reaped = time.monotonic()
                with contextlib.suppress(ServiceUnavailable), redis_errors():
                    leases.reap(self.store.redis, self.app)
            if time.monotonic() - looked >= self.settings.reconcile_seconds / 4:
                looked = time.monotonic()
                with contextlib.suppress(ServiceUnavailable):
                    reconcile(self.store, self.app, job_id, self.settings.reconcile_seconds)
            time.sleep(interval)

    def results(self, job_id: str) -> Iterator[ItemRecord]:
        """Item records from Redis, or from the manifest when Redis no longer has the job;
        their artifacts' URIs derived from the job's output (records.derived)."""
        check_job_id(job_id)
        if not self.store.live(job_id):
            output = self._output_of(job_id)
            _, records = read_manifest(self.storage(output), job_id)
        else:
            output = self.store.verified_info(job_id).output
            records = item_records(self.store, self.storage(output), job_id)
        return (derived(record, output, job_id) for record in records)

    def jobs(self, limit: int = 20) -> list[JobStatus]:
        return [self.store.status(job_id) for job_id in self.store.recent(limit)]

    def prune(self) -> dict[str, int]:
        """Forget expired jobs now and seal finished ones that were never sealed."""
        return self.store.prune()

    def download(self, job_id: str, directory: str) -> int:
        """Copy a job's artifacts and manifest into DIRECTORY/<item>/; returns files copied.
        Nothing is written through a symlink found inside DIRECTORY (a folder or file an
        attacker planted there could otherwise aim the copy anywhere the user can write)."""
        check_job_id(job_id)
        copied = 0
        os.makedirs(directory, exist_ok=True)
        top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for record in self.results(job_id):
                if not record.artifacts:
                    continue
                # The item and names are derived (records.derived); checked all the same.
                if (
                    not ITEM_NAME.fullmatch(record.item)
                    or not set(record.artifacts) <= ARTIFACT_NAMES
                ):
                    raise InvalidInput(f"refusing an unsafe artifact name in job {job_id}")
                folder = _open_folder(top, record.item, directory)
                try:
                    for filename, uri in record.artifacts.items():
                        _write_in(folder, filename, self._read_artifact(uri))
                        copied += 1
                finally:
                    os.close(folder)
        finally:
            os.close(top)
        return copied

    def _read_artifact(self, uri: str) -> bytes:
        try:
            return read_uri(uri, max_bytes=ARTIFACT_MAX_BYTES)
        except ItemError as error:
            raise ServiceUnavailable(f"cannot read {uri}: {error.message}") from None

    def report(self, job_id: str, out: str | None = None, gallery: Gallery | None = None) -> str:
        """Write the job's HTML audit report to `out` (a file), or next to its artifacts;
        returns where it went. `gallery` chooses the items it shows images of."""
        check_job_id(job_id)
        status = self.status(job_id)
        summary = {**status.as_json(), "info": status.info.model_dump(mode="json")}
        # A live job's output is read (and the report written there) only as its sealed
        # record says: an edit in Redis must not send the auditor's reads elsewhere.
        live = self.store.live(job_id)
        output = self.store.verified_info(job_id).output if live else status.info.output
        page = build_report(
            summary,
            _Records(self, job_id),
            lambda uri: read_uri(uri, max_bytes=ARTIFACT_MAX_BYTES),
            gallery or Gallery(),
            max_pixels=self.settings.max_pixels,
            read_original=self._originals(output, job_id),
        ).encode()
        if out:
            with open(out, "wb") as handle:
                handle.write(page)
            return os.path.abspath(out)
        try:
            return self.storage(output).put(job_key(job_id, REPORT_HTML), page, "text/html")
        except ItemError as error:
            raise ServiceUnavailable(f"cannot write the report: {error.message}") from None

    def _originals(self, output: str, job_id: str) -> Callable[[str], bytes]:
        """How the auditor's machine reads an item's input image, named by a record: a
        dataset row's staged image only where it is the job's own; any other input only as
        a worker here would read it (EXPLAINCTL_ALLOWED_ROOTS, the byte cap, never over
        http); a row's source id, nothing."""
        roots = self.settings.allowed_roots or None
        cap = self.settings.max_image_bytes

        def read(uri: str) -> bytes:
            if own_file(uri, output, job_id, STAGED_INPUTS) == uri:
                return read_uri(uri, max_bytes=cap)
            if is_source_id(uri):
                raise ItemError("not-found", "a dataset row whose image was not staged")
            return read_uri(uri, max_bytes=cap, allowed_roots=roots)

        return read

    def export_fiftyone(self, job_id: str, dataset: str | None = None, media: str | None = None):
        """Create or extend a FiftyOne dataset (default `explainctl-<job>`) with the job's
        items; images not on this machine are downloaded to `media` (default
        $EXPLAINCTL_HOME/media). Returns an Exported (exports/fiftyone_dataset.py)."""
        from explainctl.exports import fiftyone_dataset

        check_job_id(job_id)
        status = self.status(job_id)
        live = self.store.live(job_id)
        output = self.store.verified_info(job_id).output if live else self._output_of(job_id)
        return fiftyone_dataset.export(
            job_id,
            self.results(job_id),
            dataset or f"explainctl-{job_id}",
            media or str(self.settings.home_dir / "media"),
            read_original=self._originals(output, job_id),
            heatmap_scale=status.info.params.heatmap_scale,
        )

    # --- changing ---------------------------------------------------------------------

    def cancel(self, job_id: str) -> Cancelled:
        """Stop a job. One that has already finished is left as it is, manifest included."""
        before = self.store.status(check_job_id(job_id))
        cancelled = self.store.cancel(job_id)
        if cancelled is None:
            return Cancelled(0, finished=self.store.status(job_id).state)
        if before.state == "interrupted":
            # Nothing more will be queued: the job may now finish (and expire) as it stands.
            self.store.mark_submitted(job_id)
        status = self.store.status(job_id)
        if status.counts.get("running", 0) == 0:
            # Written only where the job's sealed record says (RecordTampered otherwise):
            # the items are cancelled whatever, the manifest is not sent elsewhere.
            output = self.store.verified_info(job_id).output
            write_manifest(self.store, self.storage(output), job_id)
        return Cancelled(cancelled)

    def retry(self, job_id: str, failed_only: bool = False) -> int:
        """Queue again the items that did not finish (only the failed ones with failed_only).
        It holds the job's submit claim while it sends, so the reconciler does not take its
        not yet sent items for lost ones."""
        info = self.store.verified_info(check_job_id(job_id))  # what its chunks carry
        token = secrets.token_hex(8)
        if not self.store.claim_submitter(job_id, token):
            raise InvalidInput(f"job {job_id} is being queued by another submit or retry")
        try:
            states = {"failed"} if failed_only else {"failed", "cancelled"}
            reopened = self.store.reopen(job_id, states)
            items = reopened.items
            if reopened.tampered:
                log.error("job %s: %d items have records that do not verify against the "
                          "signing keys: failed as record-tampered, not sent", job_id,
                          len(reopened.tampered))  # fmt: skip
                if self.store.fail_tampered(job_id, reopened.tampered):
                    write_manifest(self.store, self.storage(info.output), job_id)
            size, renewed = info.chunk_size, time.monotonic()
            for start in range(0, len(items), size):
                chunk, unsent = items[start : start + size], items[start + size :]
                number = self.store.new_chunk_number(job_id)
                if refusal := self._send_or_fail(info, chunk, number, unsent):
                    raise ServiceUnavailable(
                        f"{refusal}; requeued {start} of its {len(items)} items, "
                        f"{len(items) - start} failed as not-queued (retry once the broker "
                        "is back)"
                    )
                if time.monotonic() - renewed > 2:
                    self.store.renew_submitter(job_id, token)
                    renewed = time.monotonic()
        finally:
            with contextlib.suppress(ServiceUnavailable):
                self.store.release_submitter(job_id)
        return len(items)
