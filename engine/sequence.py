"""A request inside the engine: its tokens, its KV blocks and how far its prefill has come."""

from __future__ import annotations

import enum
import itertools
import math
import time

from kairos.engine.tokenizer import IncrementalDetokenizer
from kairos.scheduler.request import RequestSLO, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks
    RUNNING = "running"  # holds KV blocks: prefilling (maybe in chunks) or decoding
    HANDED_OFF = "handed_off"  # prefill done on a prefill worker; blocks held until decode has the KV
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_ids = itertools.count()
PENDING = -1  # a token sampled on the device whose value the host does not have yet


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), detokenizer: IncrementalDetokenizer | None = None,
                 request_id: str | None = None, prompt: str | None = None, slo: RequestSLO | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt then output
        # Trailing output tokens still on the device (PENDING here): an overlapped step
        # launches before the last one's tokens reach the host. `pending_row` is the newest
        # one's row in its step's sampled ids, where the next step's input is read from.
        self.num_pending = 0
        self.pending_row = 0
        self.params = params
        self.stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_token_ids.update(eos_token_ids)
        self.detokenizer = detokenizer
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V is in the cache
        self.num_cached_tokens = 0  # of the prompt, served by prefix-cache hits (last admission)
        self.num_text_streamed = 0  # characters of text already handed to a stream
        self.slo = slo or RequestSLO()  # what the scheduling policies go by
        self.arrival_time = time.monotonic()
        self.finish_time = math.nan  # monotonic, once it finished
        self.token_times: list[float] = []  # when each output token was sampled (monotonic)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def first_token_time(self) -> float:
        """When the first output token was sampled (on a decode worker: when its KV offer came),
        which starts the TPOT clock; the arrival time before that."""
        return self.token_times[0] if self.token_times else self.arrival_time

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def ends_here(self, num_output_tokens: int) -> bool:
        """Whether the output ends at this length as at an end token (params.eos_after)."""
        eos_after = self.params.eos_after
        return eos_after is not None and num_output_tokens >= eos_after

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token is missing from the cache: a prefill (or recompute) step."""
        return self.num_uncomputed_tokens > 1 or self.num_output_tokens == 0

    def latest_output(self) -> tuple[int, int]:
        """The newest output token whose value is known, and its index among the outputs."""
        end = len(self.token_ids) - self.num_pending
        return end - 1 - self.num_prompt_tokens, self.token_ids[end - 1]

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def take_text_delta(self) -> str:
        """The text not yet streamed, less any tail that may still become part of a stop string
        (a stop string can span tokens, and stopped text is cut). Everything once finished."""
        text = self.text
        end = len(text)
        if not self.is_finished:
            for stop in self.params.stop:
                # Each stop looks at all the unstreamed text, not what an earlier stop left.
                for n in range(min(len(stop) - 1, len(text) - self.num_text_streamed), 0, -1):
                    if text.endswith(stop[:n]):
                        end = min(end, len(text) - n)
                        break
        delta = text[self.num_text_streamed : end]
        self.num_text_streamed = max(self.num_text_streamed, end)
        return delta

    def append_token(self, token_id: int, max_model_len: int) -> FinishReason | None:
        """Adds a sampled token and returns why the sequence must stop, if it must."""
        self.append_pending()
        return self.resolve_pending(token_id, max_model_len)

    def append_pending(self) -> None:
        """Adds a token sampled by a step whose result is still on the device."""
        self.token_ids.append(PENDING)
        self.num_pending += 1

    def resolve_pending(self, token_id: int, max_model_len: int) -> FinishReason | None:
        """Fills in the oldest pending token and returns why the sequence must stop there, if it
        must; tokens pending after a stop are dropped (their step computed them in vain)."""
        index = len(self.token_ids) - self.num_pending
        self.token_ids[index] = token_id
        self.num_pending -= 1
        self.token_times.append(time.monotonic())
        reason = self._stop_reason(token_id, index + 1, max_model_len)
        if reason is not None:
            self.drop_pending()
        return reason

    def drop_pending(self) -> None:
        if self.num_pending:
            del self.token_ids[-self.num_pending :]
            self.num_pending = 0

    def _stop_reason(self, token_id: int, length: int, max_model_len: int) -> FinishReason | None:
        if self.detokenizer is not None:
            delta = self.detokenizer.push(token_id)
            if delta and self.params.stop and self._truncate_at_stop(len(delta)):
                return FinishReason.STOP
        if token_id in self.stop_token_ids or self.ends_here(length - self.num_prompt_tokens):
            reason = FinishReason.STOP
        elif length - self.num_prompt_tokens >= self.params.max_tokens or length >= max_model_len:
            reason = FinishReason.LENGTH
        else:
            return None
        if self.detokenizer is not None:
            self.detokenizer.flush()
        return reason

    def _truncate_at_stop(self, delta_len: int) -> bool:
        text = self.detokenizer.text
        # Only a match that includes new text counts; earlier text was checked already.
        start = max(0, len(text) - delta_len - max(len(s) for s in self.params.stop) + 1)
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.detokenizer.text = text[: min(hits)]
        return True
