"""The text encoder replayed from CUDA graphs (`text_encoder_graph`): the encode stage's speed.

Z-Image encodes a prompt with a 4 B-parameter Qwen3 over 512 padded tokens. On the GPU that is
~15 ms of kernels but ~45 ms of wall time: 36 layers launched one small op at a time from Python,
the GPU waiting on the CPU (H100, docs/PERFORMANCE.md). The call has one shape per batch size —
the pipeline always pads to 512 tokens — so it is captured once per batch size into a CUDA graph
and replayed: the same kernels, launched in one go.

Installed as the text encoder's forward, so diffusers' own `encode_prompt` (chat template,
tokenizer, picking the valid tokens) is unchanged; only its one kind of call is served from a
graph, every other call runs the encoder's own forward. The padding mask goes in as the 4-D
causal-and-padding mask transformers would build from it: given a 4-D mask, the model uses it as
it is, with no data-dependent check on the way (one, `mask.all()`, would need the host mid-graph).
A capture that fails leaves the encoder eager for the life of the process, with the reason logged.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger("app.runtime.encoder_graph")


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) padding mask → (B, 1, S, S) boolean mask, True where a query may attend to a key:
    earlier-or-same positions that are not padding. What transformers derives from the 2-D mask."""
    seq = attention_mask.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # static inputs: copied into before each replay
    mask: torch.Tensor
    hidden: torch.Tensor  # static output: overwritten by the next replay


class _Output:
    """The part of transformers' model output that diffusers reads: hidden_states[-2]."""

    def __init__(self, penultimate: torch.Tensor):
        self.hidden_states = (penultimate, None)


class GraphedTextEncoder:
    """The text encoder's forward: a replay for (input_ids (B, seq_len), padding mask,
    output_hidden_states=True) from the installing thread, the eager forward for anything else."""

    def __init__(self, encoder: torch.nn.Module, seq_len: int = 512):
        self.eager: Callable = type(encoder).forward.__get__(encoder)
        self.seq_len = seq_len
        self.graphs: dict[int, _Captured] = {}
        self.pool = None  # one memory pool for every batch size's graph, made at the first capture
        self.owner = threading.get_ident()  # captures and replays share static buffers: one thread
        self.broken: Optional[str] = None  # why graphs are off for good, once a capture failed
        self.replays = 0

    def __call__(self, input_ids=None, attention_mask=None, output_hidden_states=None, **kwargs):
        if (
            self.broken
            or kwargs
            or not output_hidden_states
            or input_ids is None
            or attention_mask is None
            or input_ids.ndim != 2
            or input_ids.shape[1] != self.seq_len
            or attention_mask.shape != input_ids.shape
            or not input_ids.is_cuda
            or torch.is_grad_enabled()
            or threading.get_ident() != self.owner
        ):
            return self.eager(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=output_hidden_states,
                **kwargs,
            )
        captured = self.graphs.get(input_ids.shape[0]) or self._capture(input_ids, attention_mask)
        if captured is None:
            return self.eager(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        captured.input_ids.copy_(input_ids)
        captured.mask.copy_(causal_padding_mask(attention_mask))
        captured.graph.replay()
        self.replays += 1
        # a copy: the caller keeps embeddings (the prompt cache) past the next replay
        return _Output(captured.hidden.clone())

    def _penultimate(self, input_ids, mask):
        return self.eager(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        ).hidden_states[-2]

    def _capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[_Captured]:
        batch = input_ids.shape[0]
        try:
            static_ids = input_ids.clone()
            static_mask = causal_padding_mask(attention_mask)
            # warm-up runs on a side stream, as torch.cuda.graphs asks: lazy init and cuBLAS workspaces
            # happen outside the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._penultimate(static_ids, static_mask)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self._penultimate(static_ids, static_mask)
        except Exception as exc:  # an encoder that does something a graph cannot hold: eager for good
            self.broken = f"{exc.__class__.__name__}: {str(exc)[:300]}"
            log.warning(
                "text encoder CUDA graph capture failed; encoding eagerly",
                extra={"event": "encoder_graph_failed", "batch": batch, "error": self.broken},
            )
            return None
        captured = _Captured(graph, static_ids, static_mask, hidden)
        self.graphs[batch] = captured
        log.info(
            "captured the text encoder for a batch size",
            extra={"event": "encoder_graph_captured", "batch": batch},
        )
        return captured


def install(encoder: torch.nn.Module, seq_len: int = 512) -> GraphedTextEncoder:
    graphed = GraphedTextEncoder(encoder, seq_len)
    encoder.forward = graphed
    return graphed


def uninstall(encoder: torch.nn.Module) -> None:
    encoder.__dict__.pop("forward", None)
