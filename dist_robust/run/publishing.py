"""Publishing a run's outputs to its output directory, which may be a remote store.

With a local ``--output-dir`` the run writes there directly and nothing here has work to do. With a
remote one (``s3://``, ``gs://``, ...) the run works in a local staging directory, its *mirror*: every
checkpoint is complete there (files, manifest, pointer) before it is published, and publishing (tag files,
then manifests, then pointers, then deletions) retries with backoff. When the store stays unreachable the
run goes on and the checkpoint waits in staging; the next save publishes everything that waits, and
:meth:`Publisher.publish_all` at the end of the run retries for ``publish_timeout`` seconds before
:meth:`Publisher.check_published` fails with a message saying where it all is.

The seam with :class:`dist_robust.run.checkpointing.CheckpointStore`: the store saves a tag into
:attr:`Publisher.local_root`, then calls :meth:`Publisher.saved` with the tag and what it pruned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

from dist_robust.infra import distributed as D
from dist_robust.infra import storage
from dist_robust.run.tags import BEST, BEST_PREFIX, LATEST, MANIFEST, CheckpointError, checked_tag, one_segment, read_pointer

log = logging.getLogger(__name__)

QUICK_PUBLISH_S = 10.0  # retrying during training: a checkpoint that cannot go out waits for the next one


class PublishError(RuntimeError):
    """The remote store stayed unreachable; the run's checkpoints are complete in staging."""


class Publisher:
    """The run's local mirror of its output directory, and the copying of what it holds to the store."""

    def __init__(self, output_dir: str, staging_dir: str | None, publish_timeout: float = 600.0):
        self.output_dir = output_dir
        self.remote = not storage.is_local(output_dir)
        self.publish_timeout = publish_timeout
        self.unpublished: list[str] = []  # staged tags the store does not have yet (remote only)
        self.saved_here: set[str] = set()  # tags this run saved (complete in staging)
        self.unpublished_outputs: list[str] = []  # results.json, model, ... left in staging at the end
        self._store_down = False
        self._last_error = ""
        self._gave_up = ""  # the error that ended the end-of-run publishing
        if self.remote:
            # One staging directory per destination, so concurrent runs never share one.
            key = hashlib.sha1(output_dir.encode()).hexdigest()[:12]
            staging = staging_dir or storage.private_dir("staging", key)
            self.local_root = os.path.join(staging, "checkpoints")
            if D.local_rank() == 0:  # an earlier run's leftovers: the published checkpoints are the truth
                shutil.rmtree(self.local_root, ignore_errors=True)
        else:
            self.local_root = os.path.join(storage.local_path(output_dir), "checkpoints")
        self.root = storage.join(output_dir, "checkpoints")

    @property
    def mirror(self) -> str:
        """The local directory that is (or stages) the output directory."""
        return os.path.dirname(self.local_root)

    def saved(self, tag: str, pruned: list[str]) -> None:
        """Collective: ``tag`` is complete in :attr:`local_root` and ``pruned`` tags are gone from it; publish
        them (a few seconds of retries at most: training waits seconds, not minutes)."""
        self.saved_here = (self.saved_here - set(pruned)) | {tag}
        if self.remote:
            self.unpublished = [t for t in self.unpublished if t not in pruned and t != tag] + [tag]
            self.publish(min(QUICK_PUBLISH_S, self.publish_timeout))

    def publish(self, budget_s: float) -> bool:
        """Copy the unpublished tags, then the pointers, to the store, and delete what staging pruned.

        Collective. Transient storage errors are retried with backoff for ``budget_s`` seconds;
        then the tags stay unpublished (one warning while the store stays away) and False is
        returned. The store's pointers only ever name tags whose files and manifest it holds.
        """
        if not self.remote or not self.unpublished:
            return True
        error = None
        if D.local_rank() == 0:  # each node uploads the files it holds
            error = self._try(lambda: [self._upload_files(t) for t in self.unpublished], budget_s)
        errors = [e for e in D.gather_objects(error) if e]
        if not errors and D.is_main():
            error = self._try(self._publish_pointers, budget_s)
        errors = [e for e in D.gather_objects(error) if e]
        if errors:
            self._last_error = errors[0]
            if not self._store_down:
                log.warning("could not publish checkpoint(s) %s to %s (%s); training goes on and they wait in %s "
                            "until the store is back", ", ".join(self.unpublished), self.root, errors[0],
                            self.local_root)
            self._store_down = True
            return False
        if self._store_down:
            log.warning("%s is reachable again: published %s", self.root, ", ".join(self.unpublished))
        self._store_down = False
        self.unpublished = []
        return True

    def _try(self, work, budget_s: float) -> str | None:
        try:
            storage.with_retries(work, budget_s, f"publishing to {self.root}")
        except Exception as err:  # noqa: BLE001 - reported to every rank, raised by publish_all
            return f"{type(err).__name__}: {err}"
        return None

    def _upload_files(self, tag: str) -> None:
        """This node's files of a staged tag, all but the manifest (which goes after every node's)."""
        local_tag, remote_tag = os.path.join(self.local_root, tag), storage.join(self.root, tag)
        if os.path.isdir(local_tag):
            storage.remove(remote_tag)  # a partial upload of an earlier attempt
            storage.upload_dir(local_tag, remote_tag, skip=(MANIFEST,))

    def _publish_pointers(self) -> None:
        for tag in self.unpublished:  # manifests after every node's files
            manifest = os.path.join(self.local_root, tag, MANIFEST)
            if os.path.isfile(manifest):
                storage.upload_file(manifest, storage.join(self.root, tag, MANIFEST))
        for pointer in (LATEST, BEST):
            tag = read_pointer(os.path.join(self.local_root, pointer))
            if tag is not None:
                if storage.isdir(storage.join(self.root, pointer)):  # a `best` directory of an older version
                    storage.remove(storage.join(self.root, pointer))
                storage.write_text(storage.join(self.root, pointer), tag)
        kept = set(os.listdir(self.local_root))
        for name in storage.listdir(self.root):
            if name.startswith(("step-", BEST_PREFIX)) and name not in kept:
                storage.remove(storage.join(self.root, name))

    def publish_all(self) -> None:
        """At the end of a run (collective): publish the waiting checkpoints, retrying up to ``publish_timeout``."""
        if self.remote and self.unpublished and not self.publish(self.publish_timeout):
            self._gave_up = self._last_error

    def publish_text(self, rel: str, text: str) -> None:
        """Write an output file (``results.json``, ...) of the run: locally, then published with retries."""
        if not self.remote:
            storage.write_text(storage.join(self.output_dir, rel), text)
            return
        local = os.path.join(self.mirror, rel)
        storage.write_text(local, text)
        self._publish_output(lambda: storage.upload_file(local, storage.join(self.output_dir, rel)), rel)

    def publish_dir(self, rel: str) -> None:
        """Publish ``<mirror>/<rel>`` (the exported model, the tokenizer) with retries; nothing to do locally."""
        if self.remote:
            local = os.path.join(self.mirror, rel)
            self._publish_output(lambda: storage.upload_dir(local, storage.join(self.output_dir, rel)), rel)

    def _publish_output(self, work, rel: str) -> None:
        """Once the store has been given up on, later outputs only stay local (one wait, not one per file)."""
        if not self._gave_up:
            error = self._try(work, self.publish_timeout)
            if error is None:
                return
            self._gave_up = error
        self.unpublished_outputs.append(rel)

    def check_published(self) -> None:
        """Raise :class:`PublishError` naming everything the store did not get, and where it is instead."""
        if not (self.unpublished or self.unpublished_outputs):
            return
        what = [f"checkpoint {t}" for t in self.unpublished] + self.unpublished_outputs
        raise PublishError(
            f"could not publish {', '.join(what)} to {self.output_dir} within --publish-timeout "
            f"{self.publish_timeout:g} s ({self._gave_up}). Nothing is lost: all of it is in {self.mirror} "
            f"(checkpoints verified by their manifest.json); copy that directory to {self.output_dir} when the "
            f"store is back (for example with `aws s3 cp --recursive` or `gsutil -m cp -r`), or rerun with a "
            f"longer --publish-timeout")

    def published(self, pointer: str) -> str | None:
        """The tag a pointer names in the output directory itself (the store, when remote)."""
        uri = storage.join(self.root, pointer)
        if not storage.exists(uri) or storage.isdir(uri):
            return None
        return checked_tag(storage.read_text(uri).strip(), uri)

    def fetch(self, source_root: str, tag: str) -> str:
        """Make ``source_root/tag`` available locally on every node (collective); return the local root.

        Nothing is checked here: the checkpoint store verifies the tag's manifest before any load.
        """
        one_segment(tag)
        if storage.is_local(source_root):
            local = storage.local_path(source_root)
        elif source_root == self.root and tag in self.saved_here:
            local = self.local_root  # this run's own checkpoint, complete in staging (published or not)
        else:
            local = self.local_root
            if D.local_rank() == 0:
                target = os.path.join(local, tag)
                shutil.rmtree(target, ignore_errors=True)
                try:
                    storage.download_dir(storage.join(source_root, tag), target)
                except storage.UnsafePathError as err:
                    raise CheckpointError(f"checkpoint {storage.join(source_root, tag)}: {err}") from None
            if source_root == self.root and D.is_main():
                # Staging mirrors the store from here on: its pointers, until this run moves them.
                for pointer in (LATEST, BEST):
                    found = self.published(pointer)
                    if found is not None and read_pointer(os.path.join(self.local_root, pointer)) is None:
                        storage.write_text(os.path.join(self.local_root, pointer), found)
            D.barrier()
        return local
