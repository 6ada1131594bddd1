"""The VQ-VAE encode of the next batch of images, run while the current batch is scored.

The encoder runs in exact fp32 (tokens must not depend on the device's precision), so on a GPU it costs a large
share of a step; it depends on nothing the scoring computes. On CUDA :meth:`EncodeAhead.start` queues the encode on a
side stream and returns at once, and :meth:`EncodeAhead.finish` makes the default stream wait for it (an event, not
the host) and hands the latents over (``record_stream``, so their memory is not reused while the default stream still
reads them). On a CPU there is one stream: ``start`` encodes at once, and the latents are the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import Model
from .transfers import upload


@dataclass
class Encoding:
    """Latents being computed: ``done`` is the side stream's event (None: already computed)."""

    latents: torch.Tensor
    done: torch.cuda.Event | None = None


class EncodeAhead:
    """Starts a batch's encode on a side stream (CUDA) or at once (elsewhere); :meth:`finish` returns its latents."""

    def __init__(self, model: Model):
        self.model = model
        self.stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

    def start(self, x: torch.Tensor) -> Encoding:
        """B, 3, R, R images in [-1, 1] (host or device) → their encode, started."""
        if self.stream is None:
            return Encoding(self.model.encode(x))
        main = torch.cuda.current_stream(self.model.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(main)          # weights the default stream last wrote (an added class) are ready
            latents = self.model.encode(upload(x.float(), self.model.device))
            done = torch.cuda.Event()
            done.record(self.stream)
        return Encoding(latents, done)

    def finish(self, encoding: Encoding) -> torch.Tensor:
        """The latents, usable on the current stream (which waits for the encode on the device, not on the host)."""
        if encoding.done is not None:
            main = torch.cuda.current_stream(self.model.device)
            main.wait_event(encoding.done)
            encoding.latents.record_stream(main)
        return encoding.latents
