"""`tts --stream -o -`: a wav streamed to stdout, chunk by chunk, with a header that tells the truth when it can."""

from __future__ import annotations

import os
import struct
import sys

import numpy as np

RATE = 24000


class StdoutWav:
    """A 24 kHz mono PCM16 wav streamed to stdout. Into a pipe the header cannot know the length, so its sizes
    say 'unknown' (0xFFFFFFFF), which players and sox/ffmpeg read up to the end of the stream; when stdout is
    a regular file we can seek in (`-o - > x.wav`), the sizes are patched at the end (also after Ctrl-C)."""

    def __init__(self) -> None:
        self.samples_written = 0
        self.start: int | None = None  # where the wav begins in a seekable stdout file

    def __enter__(self):
        rate = RATE
        header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack(
            "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF)
        sys.stdout.buffer.flush()
        self.start = _patchable_offset(sys.stdout.buffer)
        sys.stdout.buffer.write(header)
        sys.stdout.buffer.flush()
        return self

    def write(self, samples) -> None:
        audio = np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1), nan=0.0, posinf=1.0, neginf=-1.0)
        sys.stdout.buffer.write(np.rint(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes())
        sys.stdout.buffer.flush()
        self.samples_written += len(audio)

    @property
    def seconds(self) -> float:
        return self.samples_written / RATE

    def __exit__(self, *exc) -> None:
        data = 2 * self.samples_written
        if self.start is None or 36 + data > 0xFFFFFFFF:
            return None
        sys.stdout.buffer.flush()
        descriptor = sys.stdout.buffer.fileno()
        os.pwrite(descriptor, struct.pack("<I", 36 + data), self.start + 4)
        os.pwrite(descriptor, struct.pack("<I", data), self.start + 40)
        return None


def _patchable_offset(stream) -> int | None:
    """The current offset of ``stream`` when it is a regular file opened for writing in place (not a pipe, a
    terminal, or a file opened for appending, where pwrite would append): there the header can be patched."""
    import stat

    try:
        import fcntl  # POSIX; elsewhere the header keeps saying 'unknown'

        descriptor = stream.fileno()
        if not stat.S_ISREG(os.fstat(descriptor).st_mode) or fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_APPEND:
            return None
        return os.lseek(descriptor, 0, os.SEEK_CUR)
    except (ImportError, OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return None
