"""One request's engine deltas (`StepOutput`) turned into API-level pieces: reasoning, content, tool calls,
logprobs, and at the end the finish reason and usage counts.

`OutputTracker` is the single place where model text is split (via `chat.StreamingParser`), so streaming
and non-streaming answers of both API families agree, and DSML markup can never leak into content: the
parser holds back any tail that may still become `｜DSML｜`, `</think>` or EOS. The OpenAI and Anthropic
routes only translate its `Delta`s into chunks / events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ascend_v4.chat.parsing import IdFactory, StreamingParser, ToolCall, random_call_id
from ascend_v4.runtime.engine import StepOutput
from ascend_v4.runtime.sampling import Sampled


@dataclass
class Delta:
    """What one engine step added to one request, split for the API."""

    text: str = ""  # raw text (completions); chat uses reasoning / content / tool_calls
    reasoning: str = ""
    content: str = ""
    tool_calls: list[tuple[int, ToolCall]] = field(default_factory=list)  # (index among this reply's calls, call)
    logprobs: list[Sampled] = field(default_factory=list)
    finished: bool = False

    @property
    def empty(self) -> bool:
        return not (self.text or self.reasoning or self.content or self.tool_calls or self.logprobs or self.finished)


class OutputTracker:
    """Feed a request's StepOutputs in order; read `Delta`s back, then totals once finished.

    Args:
        chat: parse reasoning / content / DSML tool calls; False = raw text (completions).
        thinking: the prompt ended with `<think>`, so output starts as reasoning.
        tools_enabled: report parsed tool calls (without tools they are still cut out of the content).
        forced_prefix: generation prefix that the prompt already contains (tool_choice required / named):
            the parser reads it first, as if the model had written it.
        think_end_id: token id of `</think>`, to count reasoning tokens exactly.
        make_id: id factory of tool calls (`call_...` for OpenAI, `toolu_...` for Anthropic).
        prompt_index: which prompt of the request this choice continues (usage counts each prompt once).
    """

    def __init__(self, *, chat: bool = True, thinking: bool = False, tools_enabled: bool = False,
                 forced_prefix: str = "", think_end_id: int | None = None, make_id: IdFactory = random_call_id,
                 prompt_index: int = 0):
        self.parser = StreamingParser(thinking=thinking, make_id=make_id) if chat else None
        if self.parser is not None and forced_prefix:
            self.parser.feed(forced_prefix)  # yields nothing: it only moves the parser into the DSML block
        self.tools_enabled = tools_enabled
        self.prompt_index = prompt_index
        self.think_end_id = think_end_id
        self._counting_reasoning = chat and thinking
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[Sampled] = []
        self.prompt_logprobs: list[Sampled | None] | None = None  # SamplingParams.prompt_logprobs, once prefilled
        self.reasoning_tokens = 0
        self.num_tool_calls = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None  # engine's: stop | length | abort | error
        self.stop_reason: str | int | None = None

    def feed(self, out: StepOutput) -> Delta:
        d = Delta(logprobs=list(out.logprobs))
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for t in out.new_token_ids:
            if self._counting_reasoning:
                self.reasoning_tokens += 1  # the </think> delimiter counts as reasoning
                if t == self.think_end_id:
                    self._counting_reasoning = False
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
        self.completion_tokens = out.completion_tokens
        self.text += out.new_text
        if self.parser is None:
            d.text = out.new_text
        else:
            events = self.parser.feed(out.new_text) if out.new_text else []
            if out.finished:
                events += self.parser.finish()
            for e in events:
                if e.kind == "reasoning":
                    d.reasoning += e.text
                elif e.kind == "content":
                    d.content += e.text
                elif e.tool_call is not None and self.tools_enabled:
                    d.tool_calls.append((self.num_tool_calls, e.tool_call))
                    self.num_tool_calls += 1
        if out.finished:
            self.finished, d.finished = True, True
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        return d

    # -- results -----------------------------------------------------------------------------------------
    @property
    def reasoning_content(self) -> str | None:
        return self.parser.message.reasoning_content if self.parser is not None else None

    @property
    def content(self) -> str:
        return self.parser.message.content if self.parser is not None else self.text

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self.parser.message.tool_calls) if self.parser is not None and self.tools_enabled else []

    def openai_finish_reason(self) -> str | None:
        r = self.finish_reason
        if r == "stop" and self.tool_calls:
            return "tool_calls"
        return r

    def anthropic_stop(self) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) in Anthropic's vocabulary."""
        if self.finish_reason == "length":
            return "max_tokens", None
        if self.tool_calls:
            return "tool_use", None
        if isinstance(self.stop_reason, str):
            return "stop_sequence", self.stop_reason
        return "end_turn", None


def token_text(tokenizer, token_id: int) -> str:
    """One token as text (a partial UTF-8 character shows as U+FFFD, like OpenAI's logprob tokens)."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
