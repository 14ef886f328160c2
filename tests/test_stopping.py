"""A stop (SIGTERM, Ctrl+C) never lands inside a tracking store's write: the run still closes as KILLED."""

import os
import signal
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from dist_robust.run.stopping import Stopped, shielded, stops_as_exceptions
from dist_robust.run.tracking import ResilientTracker


class _SignalsOnFloat:
    """A metric value whose conversion, inside the tracker's write, sends this process a signal."""

    def __init__(self, value: float, signum: int):
        self.value, self.signum = value, signum

    def __float__(self) -> float:
        os.kill(os.getpid(), self.signum)
        return self.value


def _metric(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.fixture
def ctrl_c_handled():
    """SIGINT as in a terminal: a job started in the background (CI's, say) inherits it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, Stopped), (signal.SIGINT, KeyboardInterrupt)])
@pytest.mark.usefixtures("ctrl_c_handled")
def test_a_stop_inside_a_tracking_call_is_raised_after_it(tmp_path, signum, raised):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = ResilientTracker(str(tmp_path / "run"), uri, "stop", "r")
    after = []
    with pytest.raises(raised), stops_as_exceptions():
        tracker.log_metrics({"loss": 0.5}, 0)
        tracker.log_metrics({"loss": _SignalsOnFloat(0.25, signum)}, 1)  # the stop arrives mid-call
        after.append("reached")  # the call is done: the stop is raised here, before this line
    assert after == []
    # the interrupted call was written whole, and the store is free to close the run
    assert _metric(uri, tracker.run_id, "loss") == [(0, 0.5), (1, 0.25)]
    tracker.finish("KILLED")
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"


def test_a_stop_at_any_moment_of_a_logging_loop_closes_the_run_at_once(tmp_path):
    """The failure this guards against: SIGTERM raised inside a sqlite commit left the file locked,
    closing the run waited 2 x 20 s on the lock, and the run stayed RUNNING (about one stop in two)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for delay in (0.3, 0.45, 0.6, 0.75):
        tracker = ResilientTracker(str(tmp_path / f"run{delay}"), uri, "stop", f"r{delay}")
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
        step = 0
        with pytest.raises(Stopped), stops_as_exceptions():
            while True:
                tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-5}, step)
                step += 1
        start = time.monotonic()
        tracker.finish("KILLED")
        assert time.monotonic() - start < 5, f"closing the run took {time.monotonic() - start:.1f} s (delay {delay})"
        assert MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"
        steps = [s for s, _ in _metric(uri, tracker.run_id, "loss")]
        assert steps == list(range(len(steps))) and len(steps) >= step  # nothing sent twice, nothing lost


def test_nested_shields_hold_the_stop_until_the_outermost_ends():
    before = signal.getsignal(signal.SIGTERM)
    order = []
    with pytest.raises(Stopped), stops_as_exceptions():
        with shielded():
            with shielded():
                os.kill(os.getpid(), signal.SIGTERM)
                order.append("inner")
            order.append("outer")
        order.append("after")
    assert order == ["inner", "outer"]
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_an_ignored_ctrl_c_stays_ignored():
    """``nohup``/``&`` jobs ignore SIGINT; training must not start obeying it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stops_as_exceptions():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
