"""Real third-party clients against a live `ascend-v4 serve --model tiny` (the `main` server of
tests/e2e/conftest.py: API key, 2048-token context).

* lm-eval (`local-completions`) on two tiny tasks defined here (multiple_choice = log-likelihood requests with
  `echo` + `logprobs`, and generate_until), tokens counted by the server's own tokenizer (lm-eval's `remote`
  tokenizer backend: `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`) or by the checkpoint's
  tokenizer.json (`huggingface` backend);
* guidellm: a synchronous run of 10 requests with short synthetic prompts;
* the openai SDK's structured-output helpers: `chat.completions.parse` with a pydantic model
  (response_format json_schema), `pydantic_function_tool` with a forced `tool_choice` (thinking off), and the
  Anthropic SDK's forced `tool_choice: {"type": "tool"}`.

lm-eval and guidellm are big (about 620 MB and 340 MB on top of the `test` extra, 36 s and 21 s to install)
and guidellm pins click 8.4, so they are not in the `test` extra: `pip install -e ".[test,real-clients]"`;
without them those tests are skipped. Both are run as subprocesses (their own imports and logging), offline.

The model is a random dummy: nothing here checks answers, only that the clients complete and that outputs
which the server promises to constrain (structured outputs, forced tool calls) validate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx2 = pytest.importorskip("httpx2")
pydantic = pytest.importorskip("pydantic")

pytestmark = pytest.mark.slow

KEY = "sk-e2e"  # the main server's --api-key (tests/e2e/conftest.py)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def needs(module: str, what: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{what} not installed: it is not in the `test` extra (size); "
                                     f"pip install -e \".[real-clients]\" to run this test")


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"].url


def client_env(tmp_path: Path) -> dict:
    """Environment of a client subprocess: offline, caches under tmp_path, the server's key."""
    env = dict(os.environ, **OFFLINE_ENV, OPENAI_API_KEY=KEY, HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    return env


# ------------------------------------------------------------------------------------------------ lm-eval

MC_DOCS = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
    {"question": "Which one is a fruit?", "choices": ["stone", "chair", "apple"], "answer": 2},
    {"question": "What is frozen water called?", "choices": ["ice", "steam", "sand"], "answer": 0},
]
GEN_DOCS = [
    {"question": "Name a primary color.", "answer": "red"},
    {"question": "What is two plus two?", "answer": "four"},
    {"question": "Say yes.", "answer": "yes"},
]


def write_tasks(d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in MC_DOCS))
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GEN_DOCS))
    (d / "ascend_mc.yaml").write_text(textwrap.dedent(f"""\
        task: ascend_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
        """))
    (d / "ascend_gen.yaml").write_text(textwrap.dedent(f"""\
        task: ascend_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'gen.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
        """))
    return ["ascend_mc", "ascend_gen"]


LM_EVAL_SCRIPT = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
cfg = json.loads(sys.argv[1])
res = simple_evaluate(model="local-completions", model_args=cfg["model_args"], tasks=cfg["tasks"],
                      task_manager=TaskManager(include_path=cfg["include"]), limit=cfg["limit"],
                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                      log_samples=False)
json.dump({"results": res["results"], "n-samples": res.get("n-samples")}, open(cfg["out"], "w"), default=str)
"""


@needs("lm_eval", "lm-eval")
@pytest.mark.parametrize("tokenizer", ["remote", "huggingface"])
def test_lm_eval_local_completions(main, tiny_checkpoint, tmp_path, tokenizer):
    """lm-eval's OpenAI-completions client: log-likelihoods of multiple-choice continuations (echo + logprobs +
    max_tokens 1 on token-id prompts) and greedy generation with a stop string; metrics come out.
    `remote` needs GET /tokenizer_info (lm-eval's remote tokenizer protocol)."""
    if tokenizer == "remote":
        info = httpx2.get(main + "/tokenizer_info", trust_env=False, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"})
        assert info.status_code == 200, f"GET /tokenizer_info -> {info.status_code}: waits for /tokenizer_info"
        tok_args = {"tokenizer_backend": "remote", "auth_token": KEY}
    else:
        tok_args = {"tokenizer_backend": "huggingface", "tokenizer": str(tiny_checkpoint)}
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "results.json"
    cfg = {"model_args": {"model": "tiny", "base_url": main + "/v1/completions", "tokenized_requests": True,
                          "num_concurrent": 2, "max_retries": 1, "max_length": 2048, "timeout": 120, **tok_args},
           "tasks": tasks, "include": str(tmp_path / "tasks"), "limit": 4, "out": str(out)}
    p = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, json.dumps(cfg)], check=False, capture_output=True, text=True,
                       timeout=600, env=client_env(tmp_path), cwd=tmp_path)
    assert p.returncode == 0 and out.exists(), f"lm-eval failed (rc={p.returncode}):\n{p.stderr[-6000:]}"
    res = json.loads(out.read_text())["results"]
    mc, gen = res["ascend_mc"], res["ascend_gen"]
    print(f"lm-eval ({tokenizer} tokenizer): ascend_mc {mc}; ascend_gen {gen}")
    assert 0.0 <= float(mc["acc,none"]) <= 1.0 and 0.0 <= float(mc["acc_norm,none"]) <= 1.0, mc
    assert 0.0 <= float(gen["exact_match,none"]) <= 1.0, gen


# ----------------------------------------------------------------------------------------------- guidellm


@needs("guidellm", "guidellm")
def test_guidellm_synchronous_run(main, tiny_checkpoint, tmp_path):
    """guidellm's OpenAI HTTP backend (streamed /v1/chat/completions by default), synchronous profile, 10
    requests of ~32 prompt / 8 output tokens; its JSON report must count 10 successful requests."""
    out = tmp_path / "benchmarks.json"
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f"kind=openai_http,target={main},model=tiny,api_key={KEY}",
           "--profile", "kind=synchronous",
           "--constraint", "kind=max_requests,count=10",
           "--constraint", "kind=max_duration,seconds=240",
           "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
           "--tokenizer", f"kind=huggingface_auto,model={tiny_checkpoint}",
           "--output", f"kind=json,path={out}",
           "--disable-console-interactive"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=client_env(tmp_path), cwd=tmp_path)
    assert p.returncode == 0 and out.exists(), f"guidellm failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n" \
                                               f"{p.stderr[-6000:]}"
    report = json.loads(out.read_text())
    benches = report["benchmarks"]
    assert benches, report.keys()
    totals = benches[0]["metrics"]["request_totals"] if "metrics" in benches[0] else benches[0]["request_totals"]
    print(f"guidellm: request_totals {totals}")
    assert totals["successful"] == 10 and totals["errored"] == 0, totals


# ------------------------------------------------------------------------- structured outputs (openai SDK)


class Verdict(pydantic.BaseModel):
    """Finite schema (enums and a boolean), so a constrained random model ends it quickly."""

    color: Literal["red", "green", "blue"]
    ok: bool


class GetWeather(pydantic.BaseModel):
    """Weather of a city."""

    city: Literal["Paris", "Tokyo", "Lima"]
    unit: Literal["celsius", "fahrenheit"]


def oa(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


THINKING_OFF = {"thinking": {"type": "disabled"}}


def test_openai_parse_json_schema(main):
    """`client.chat.completions.parse(response_format=PydanticModel)` sends response_format json_schema (strict);
    the parsed object must validate. Waits for structured outputs (constrained decoding): a prompt-level JSON
    mode on the random dummy returns non-JSON and the SDK raises."""
    r = oa(main).chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Pick a color."}],
                                        response_format=Verdict, max_tokens=256, extra_body=THINKING_OFF)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Verdict), msg
    assert Verdict.model_validate_json(msg.content) == msg.parsed


def test_openai_json_object_mode(main):
    """json_object: any JSON object. A random model writing free keys / strings rarely closes them within
    max_tokens, so a cut answer (`length`) only has to start as an object; a finished one must parse."""
    for seed in range(3):
        r = oa(main).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Any JSON object."}],
                                             response_format={"type": "json_object"}, max_tokens=48, seed=seed,
                                             extra_body=THINKING_OFF)
        ch = r.choices[0]
        assert ch.finish_reason in ("stop", "length"), ch
        assert ch.message.content.startswith("{"), ch
        if ch.finish_reason == "stop":
            assert isinstance(json.loads(ch.message.content), dict), ch


def test_openai_forced_tool_call_parses(main):
    """A named tool_choice with thinking off: exactly that tool is called and its arguments validate against the
    pydantic model (the SDK's `pydantic_function_tool` + `parse` fill `parsed_arguments`). Waits for forced tool
    calls whose arguments are constrained to the schema (today the call is only started by prefix forcing and
    the random model does not finish it)."""
    tool = openai.pydantic_function_tool(GetWeather)
    r = oa(main).chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}}, max_tokens=256,
        extra_body=THINKING_OFF)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.tool_calls, ch
    call = ch.message.tool_calls[0]
    assert call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert GetWeather.model_validate_json(call.function.arguments) == call.function.parsed_arguments


def test_openai_forced_tool_call_plain_create(main):
    """The same with a hand-written JSON schema and `create` (no SDK helper), streamed: the streamed call
    arguments are one valid JSON document that validates."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": GetWeather.model_json_schema()}}]
    stream = oa(main).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Lima?"}], tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=256, stream=True,
        extra_body=THINKING_OFF)
    name, args, finish = None, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather", (finish, name, args)
    GetWeather.model_validate_json(args)


def test_anthropic_forced_tool_use_validates(main):
    client = anthropic.Anthropic(base_url=main, api_key=KEY, max_retries=0, timeout=120)
    m = client.messages.create(model="tiny", max_tokens=256, thinking={"type": "disabled"},
                               messages=[{"role": "user", "content": "Weather in Tokyo?"}],
                               tools=[{"name": "get_weather", "description": "Weather of a city",
                                       "input_schema": GetWeather.model_json_schema()}],
                               tool_choice={"type": "tool", "name": "get_weather"})
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses and uses[0].name == "get_weather", m
    GetWeather.model_validate(uses[0].input)
