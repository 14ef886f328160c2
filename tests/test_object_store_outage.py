"""--output-dir on an S3-compatible store that goes away: a real moto server through s3fs.

The store sits behind a TCP gate (tests/netgate.py) that the test closes and reopens: the
outage is a real refused connection, seen by botocore, s3fs and the retry logic as it would
be in production, while the server keeps its objects. The training process is paused
(SIGSTOP) at the log line that marks the moment, so the outage starts exactly there.

1. Lost in the middle: the store goes away after checkpoint 2 is published; checkpoint 4
   cannot go out (one warning), training goes on, the store comes back, checkpoint 6 goes out
   together with 4, and the store ends up complete (pointers, manifests, results, model).
2. Resume from the store: a second run with an empty staging directory continues from the
   store's step 6; the store goes away again and stays away: publishing retries until
   --publish-timeout, then the run fails with a message naming what is where, and the local
   copy of checkpoint 8 is complete (its manifest verifies) while the store still says step 6.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dist_robust.infra.distributed import free_port
from tests.launch import REPO, TINY, launcher_env
from tests.netgate import Gate

pytestmark = pytest.mark.launcher

FLAGS = [*TINY, "--save-steps", "2", "--eval-steps", "0", "--no-generalized", "--save-total-limit", "2",
         "--publish-timeout", "4"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """(gate, env): a moto S3 server on 127.0.0.1 behind a gate, and the environment that reaches it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)
    gate = Gate(port)
    gate.up()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{gate.port}", "AWS_MAX_ATTEMPTS": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _fs().mkdir("runs")
    yield gate, env
    gate.down()
    server.terminate()
    server.wait(timeout=30)


def _fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def _train(env: dict, flags: list[str], events: dict[str, callable]) -> tuple[int, str]:
    """Run train.py on one rank; when a line contains a key of ``events``, pause it and call the value."""
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, env=launcher_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        for marker in [m for m in events if m in line]:
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                events.pop(marker)()
            finally:
                os.kill(proc.pid, signal.SIGCONT)
    code = proc.wait(timeout=600)
    with open(os.environ.get("DIST_ROBUST_TEST_LOG", os.devnull), "a") as f:  # for looking into a slow run
        f.write("".join(lines))
    return code, "".join(lines)


@pytest.mark.slow  # make test-all; CI writes to S3 (moto) through tests/test_redaction.py
def test_store_lost_mid_run_then_back_then_resume_from_it_then_lost_for_good(store, tmp_path):
    gate, env = store
    out = "s3://runs/a"
    code, log = _train(env, [*FLAGS, "--max-steps", "6", "--output-dir", out, "--staging-dir",
                             str(tmp_path / "staging-1")],
                       {"checkpoint step-00000002 saved": gate.down,
                        "could not publish checkpoint(s) step-00000004": gate.up})
    assert code == 0, log[-5000:]
    assert log.count("could not publish") == 1  # one warning for the outage, not one per attempt
    assert "is reachable again: published step-00000004, step-00000006" in log
    fs = _fs()
    assert fs.cat("runs/a/checkpoints/latest").decode() == "step-00000006"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("runs/a/checkpoints")) == [
        "latest", "step-00000004", "step-00000006"]  # step 2 pruned from the store once 4 and 6 were in
    for tag in ("step-00000004", "step-00000006"):  # every file the manifest lists is in the store, whole
        manifest = json.loads(fs.cat(f"runs/a/checkpoints/{tag}/manifest.json"))
        for rel, meta in manifest["files"].items():
            assert fs.size(f"runs/a/checkpoints/{tag}/{rel}") == meta["size"], (tag, rel)
    first = json.loads(fs.cat("runs/a/results.json"))
    assert len(first["train_losses"]) == 6
    assert fs.exists("runs/a/model/model.safetensors") and fs.exists("runs/a/tokenizer/tokenizer.json")

    staging = tmp_path / "staging-2"  # another machine: nothing local, everything from the store
    code, log = _train(env, [*FLAGS, "--max-steps", "8", "--output-dir", out, "--resume", "auto",
                             "--staging-dir", str(staging)],
                       {"resumed from s3://runs/a/checkpoints/step-00000006": gate.down})
    assert code != 0
    assert "resumed from s3://runs/a/checkpoints/step-00000006 at step 6" in log
    errors = [line for line in log.splitlines() if line.startswith("error: could not publish")]
    assert len(errors) == 1, log[-6000:]
    error = errors[0]
    assert "checkpoint step-00000008" in error and "results.json" in error and "--publish-timeout 4 s" in error
    assert f"Nothing is lost: all of it is in {staging}" in error
    assert "Traceback" not in log
    # the local copy is complete: pointer, manifest-verified checkpoint, results continuing run 1's
    from dist_robust.run.checkpointing import verify

    assert (staging / "checkpoints" / "latest").read_text() == "step-00000008"
    verify(str(staging / "checkpoints"), "step-00000008")
    second = json.loads((staging / "results.json").read_text())
    assert second["train_losses"][:6] == first["train_losses"] and len(second["train_losses"]) == 8
    gate.up()  # and the store was never told about step 8
    assert _fs().cat("runs/a/checkpoints/latest").decode() == "step-00000006"
