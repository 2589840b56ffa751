"""PyAV reads where decord has no wheel: the same frames, the same errors, through the workers' decode code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clman import storage
from clman.data import synth
from clman.data import video as V
from tests.media import frames, pyav_mp4, sweep

decord = pytest.importorskip("decord", reason="the comparison needs decord (x86_64 Linux)")
ROOT = Path(__file__).resolve().parents[1]


def _clips() -> dict[str, bytes]:
    cfg = synth.SynthConfig()
    phantom = synth.generate_case(0, 3, 1, cfg).frames  # (48, 128, 128) uint8, the demo's sweeps
    return {
        "colour": V.encode_mp4(frames(12, 32, 32), fps=10),
        "grey-odd-size": V.encode_mp4(frames(6, 31, 33, gray=True), fps=10),  # padded to 32 x 34
        "camera-long-gop": pyav_mp4(frames(24, 48, 64), gop=250),
        "sweep-gop-8": V.encode_mp4(sweep(40, 64, 64, gray=True), fps=10, gop=8),
        "phantom-h264": synth.encode_video(phantom, "h264-mp4", cfg),
        "phantom-mjpeg-avi": synth.encode_video(phantom[:16], "mjpeg-avi", cfg),
    }


CLIPS = _clips()


def _both(fn, *args):
    """fn(*args) read by decord, then by PyAV."""
    out = []
    for reader in (V.DecordReader, V.PyAVReader):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(V, "Reader", reader)
            out.append(fn(*args))
    return out


def test_decord_is_the_reader_where_it_is_installed():
    assert V.Reader is V.DecordReader


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("size", [None, 36])
def test_pyav_gives_decords_frames(clip, size):
    data = CLIPS[clip]
    by_decord, by_pyav = _both(V.probe_video, data)
    assert by_pyav == by_decord  # frames, fps, size
    n = by_decord.num_frames
    # All frames; one; unsorted with repeats and a backward jump; a sparse spread (seeks past GOPs).
    for indices in (None, [n - 1], [n - 1, 0, n // 2, n // 2, 1], list(range(0, n, max(n // 5, 1)))):
        a, b = _both(V.decode_frames_resized, data, indices, size)
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
        assert np.array_equal(a, b), f"{clip} size {size} {indices}: max diff {np.abs(a.astype(int) - b).max()}"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", V.EMPTY),
        (b"this is a text file, not a video\n" * 20, V.NOT_A_VIDEO),
        (bytes(range(256)) * 8, V.NOT_A_VIDEO),
        (CLIPS["camera-long-gop"][: len(CLIPS["camera-long-gop"]) // 2], V.TRUNCATED),
    ],
)
def test_pyav_rejects_bad_bytes_as_decord_does(monkeypatch, data, reason):
    monkeypatch.setattr(V, "Reader", V.PyAVReader)
    for fn in (V.probe_video, V.decode_frames):
        with pytest.raises(V.VideoError) as err:
            fn(data, name="clip3")
        assert err.value.reason == reason
        assert str(err.value).startswith("clip3: ") and "\n" not in str(err.value)
    with pytest.raises(V.VideoError, match=r"clip3: frame index 12 out of range for 12 frames"):
        V.decode_frames(CLIPS["colour"], [0, 12], name="clip3")


_WORKER_DECODE = """
import json, sys
sys.modules["decord"] = None  # import decord raises ImportError, as where it has no wheel
import numpy as np
from clman.data import video
from clman.train import decode  # the module of the Ray decode tasks
assert video.decord is None and video.Reader is video.PyAVReader, video.Reader
uri, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
whole, idx = decode._decode(uri, decode.F.whole_video_indices(int(sys.argv[4])), size)
some, _ = decode._decode(uri, np.array(json.loads(sys.argv[5])), size)
bad, reason = decode._decode(uri + ".missing", np.arange(2), size)
np.savez(out, whole=whole, idx=idx, some=some)
print(json.dumps({"bad": bad, "reason": reason}))
"""


def test_worker_decode_with_decord_hidden_matches_decord(bucket, tmp_path):
    """What a Train worker's decode task runs (S3 read, decode, stored layout), in a process without decord."""
    from clman.train import decode

    uri = f"{bucket}/clips/phantom.mp4"
    storage.write_bytes(uri, CLIPS["phantom-h264"])
    n, size, some_idx = 48, 74, [40, 3, 3, 17]
    out = tmp_path / "frames.npz"
    run = subprocess.run(
        [sys.executable, "-c", _WORKER_DECODE, uri, str(size), str(out), str(n), json.dumps(some_idx)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["bad"] is None and result["reason"].startswith(f"{uri}.missing")  # a StorageError line
    hidden = np.load(out)

    whole, idx = decode._decode(uri, decode.F.whole_video_indices(n), size)  # decord, in this process
    some, _ = decode._decode(uri, np.array(some_idx), size)
    assert whole.shape == (n, 1, size, size) and some.shape == (4, 1, size, size)  # grey: one channel
    assert np.array_equal(hidden["idx"], idx)
    assert np.array_equal(hidden["whole"], whole)  # pixel-identical
    assert np.array_equal(hidden["some"], some)
