"""fastfilm/core/cuda_graph.py on a CPU: torch's own `torch.cuda.graph` context manager runs, with the CUDA calls it
makes replaced by a stream tracker and a graph whose capture_end fails as a CUDA graph's does after an op broke the
capture. Checks that a failed capture names the op's error and leaves the stream that was current before."""

import pathlib

import pytest
import torch

from fastfilm.core.cuda_graph import CaptureError, capture

ROOT = pathlib.Path(__file__).resolve().parents[1]
OP_ERROR = "operation not permitted when stream is capturing"
END_ERROR = "CUDA error: operation failed due to a previous error during capture"


class FakeStream:
    def __init__(self, name: str):
        self.name, self.device = name, torch.device("cuda", 0)


class FakeGraph:
    """Records the stream the capture began on; capture_end fails once something inside failed (`broken`)."""

    def __init__(self):
        self.began_on, self.broken = None, False

    def capture_begin(self, *args, **kwargs):
        self.began_on = torch.cuda.current_stream()

    def capture_end(self):
        if self.broken:
            raise RuntimeError(END_ERROR)

    def pool(self):
        return ("fake pool", id(self))


def fake_streams(monkeypatch) -> dict:
    """The current stream as torch.cuda.current_stream/set_stream see it (a one-device CUDA, faked), with the other
    CUDA calls torch.cuda.graph makes around a capture made harmless."""
    state = {"current": FakeStream("default")}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: state.__setitem__("current", s))
    monkeypatch.setattr(torch.cuda, "_get_device_index", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
    return state


@pytest.fixture
def streams(monkeypatch):
    return fake_streams(monkeypatch)


def test_a_capture_runs_on_its_stream_and_returns_the_result(streams):
    default, side, graph = streams["current"], FakeStream("side"), FakeGraph()
    assert capture(graph, lambda: 5, stream=side) == 5
    assert graph.began_on is side and streams["current"] is default


def broken_op(graph):
    def fn():
        graph.broken = True
        raise RuntimeError(OP_ERROR + "\nsecond line")

    return fn


def test_torchs_own_context_loses_the_op_error_and_the_stream(streams):
    # what `capture` is for: if torch ever ends its capture after restoring the stream, this test says so
    default, side, graph = streams["current"], FakeStream("side"), FakeGraph()
    with pytest.raises(RuntimeError) as info:
        with torch.cuda.graph(graph, stream=side):
            broken_op(graph)()
    assert str(info.value) == END_ERROR and streams["current"] is side and streams["current"] is not default


def test_a_failed_capture_names_the_op_and_restores_the_stream(streams):
    default, side, graph = streams["current"], FakeStream("side"), FakeGraph()
    with pytest.raises(CaptureError) as info:
        capture(graph, broken_op(graph), stream=side)
    assert (
        str(info.value) == f"RuntimeError: {OP_ERROR} (then at the capture's end: RuntimeError: {END_ERROR})"
    )
    assert streams["current"] is default


def test_an_error_that_does_not_break_the_capture_is_named_alone(streams):
    default, graph = streams["current"], FakeGraph()

    def fn():
        raise ValueError("bad shape")

    with pytest.raises(CaptureError, match=r"^ValueError: bad shape$"):
        capture(graph, fn, stream=FakeStream("side"))
    assert streams["current"] is default


def test_graph_mode_and_the_kernel_pick_capture_through_the_helper():
    for path in ("fastfilm/graphed.py", "fastfilm/kernel_pick.py"):
        text = (ROOT / path).read_text()
        assert "torch.cuda.graph(" not in text and "capture(" in text, path
