"""What a backend implements to be served: a batch of sequences that decodes one token per step.

The scheduler (backend-neutral) owns requests, queues, stop strings and streaming; an engine
owns the model, its KV cache, the adapters and sampling. Every engine method is called from one
thread only (the scheduler's), which is where MLX wants all of its work to happen; the HTTP
threads touch only ``tokenizer`` (under the HTTP layer's lock) and the plain attributes.

The protocol of one request through an engine:

    engine.prefill(req, end)  # optional, repeated: prompt_ids[:end] into the request's own cache,
                              #   outside the batch (chunked prefill; end < len(prompt_ids))
    engine.add([req])      # prefill the rest of req.prompt_ids and join the running batch;
                           #   -> {req.id: token} when the prefill already yields the first token
    engine.step()          # -> {req.id: token}: the next token of the sequences in the batch
    ...                    # the scheduler decides when a sequence is finished
    engine.remove([req.id])

Both engines return the first token from ``add`` (sampled from the prefill's last logits, which
keeps the time to the first token at one prefill), computed the way that backend's own
``generate_text`` computes it, so a greedy answer is the same token for token.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass


class AdapterError(ValueError):
    """An adapter directory that cannot be served (missing files, wrong shapes, full fine-tune)."""


class AdapterExists(AdapterError):
    """An adapter of that name is loaded already (or still unloading)."""


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # per-request generator: the same seed gives the same tokens in any batch


@dataclass
class EngineRequest:
    id: int
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    sampling: SamplingParams


class Engine(ABC):
    """A served model. Subclasses set ``name``, ``tokenizer``, ``eos_token_ids``, ``context_length``."""

    name: str  # the base model's id in /v1/models and in requests' "model" field
    tokenizer: object  # a Hugging Face tokenizer (chat template, encode)
    eos_token_ids: set
    context_length: int  # most tokens (prompt + completion) one sequence may hold
    vocab_size: int

    @abstractmethod
    def load_adapter(self, name: str, path: str) -> None:
        """Make adapter ``name`` servable from ``path`` (raise AdapterError when it cannot be)."""

    @abstractmethod
    def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name``; no sequence in the batch uses it any more."""

    @abstractmethod
    def prefill(self, request: EngineRequest, end: int) -> None:
        """Run ``request.prompt_ids`` up to ``end`` (exclusive, less than the prompt's length)
        through the model into the request's own cache, from where the previous call stopped; the
        request is not in the batch yet. The scheduler calls it on aligned chunks, ``add`` does
        the rest. When it raises, the scheduler drops the request (``remove``)."""

    @abstractmethod
    def add(self, requests: list[EngineRequest]) -> dict[int, int]:
        """Prefill the rest of each request's prompt (all of it, or what ``prefill`` left) and add
        it to the batch; {request id: first token} for the requests whose prefill already gave
        one. All or nothing: when it raises, the batch and the prefills in progress are as they were."""

    @abstractmethod
    def step(self) -> dict[int, int]:
        """One decode step: {request id: next token}. An engine may run a step ahead (the MLX
        engine does), so a sequence added since the last call may get its token only on the next."""

    @abstractmethod
    def remove(self, ids) -> None:
        """Drop these sequences from the batch, and the prefills in progress of these ids."""

    def new_detokenizer(self, raw: bool = False):
        """A streaming detokenizer (``add_token``, ``finalize``, ``last_segment``) for one sequence.
        ``raw``: the exact decoded text (a /v1/completions continuation keeps its leading space);
        otherwise the backend's own generation may tidy it as its ``generate`` does."""
        return IncrementalDetokenizer(self.tokenizer)

    def close(self) -> None:
        """Free what the engine holds (optional)."""


class IncrementalDetokenizer:
    """Streaming text from token ids for any Hugging Face tokenizer.

    Each step decodes a short window, the tokens since the last emitted boundary with the ones
    before it as context (so SentencePiece's leading-space rule sees what precedes), and emits
    the text beyond the context's own decoding once it no longer ends in a partial UTF-8
    character (U+FFFD). Same interface as mlx-lm's streaming detokenizers.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0  # window start (context)
        self.read_offset = 0  # tokens before this are emitted
        self._segment = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _advance(self, final: bool):
        context = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset:])
        if len(text) > len(context) and (final or not text.endswith("\ufffd")):
            self._segment += text[len(context):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def add_token(self, token: int):
        self.tokens.append(int(token))
        self._advance(final=False)

    def finalize(self):
        if self.read_offset < len(self.tokens):
            self._advance(final=True)

    @property
    def last_segment(self) -> str:
        segment, self._segment = self._segment, ""
        return segment
