"""The published OpenAPI schema agrees with what the server answers (schemathesis' status-code, content-type
and positive-data checks against the live app over a scripted engine, plus a walk of /openapi.json), and
`GET /tokenizer_info` (vLLM's shape, open without a key) with the path-segment API-key match."""

from __future__ import annotations

import pytest

httpx2 = pytest.importorskip("httpx2")

from ascend_v4.server.app import ERROR_STATUSES, create_app, document_responses
from ascend_v4.server.auth import is_protected
from ascend_v4.server.serving import ServerConfig

MODEL = "deepseek-v4-flash"
KEY = "sk-test"


def get(url, path, **kw):
    return httpx2.get(url + path, trust_env=False, timeout=10, **kw)


def post(url, path, body, key=KEY):
    return httpx2.post(url + path, json=body, trust_env=False, timeout=10,
                       headers={"Authorization": f"Bearer {key}"} if key else {})


def test_openapi_lists_every_status_with_the_family_error_schema(served):
    _, ctx = served()
    with ctx as url:
        schema = get(url, "/openapi.json").json()
    ops = {(m, p): op for p, o in schema["paths"].items() for m, op in o.items()}
    assert set(ERROR_STATUSES) <= set(ops), set(ERROR_STATUSES) - set(ops)
    for (method, path), op in ops.items():
        codes = set(op["responses"])
        assert "422" not in codes, (method, path)  # validation errors are 400 here
        want = {str(s) for s in ERROR_STATUSES.get((method, path), ())} | {"200", "500"}
        if is_protected(path):
            want.add("401")
            assert op["security"] == [{"bearer": []}, {"x-api-key": []}]
        assert want <= codes, (method, path, codes)
        for code in codes - {"200"}:
            if path == "/health":
                continue
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("AnthropicError" if path.startswith("/v1/messages") else "OpenAIError"), (path, code)
    assert ops[("post", "/v1/chat/completions")]["responses"]["429"]["headers"]["Retry-After"]
    assert "text/event-stream" in ops[("post", "/v1/messages")]["responses"]["200"]["content"]
    assert list(ops[("get", "/metrics")]["responses"]["200"]["content"]) == ["text/plain"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert {"OpenAIError", "AnthropicError"} <= set(schema["components"]["schemas"])


def test_openapi_without_key_has_no_401():
    schema = {"paths": {"/v1/models": {"get": {"responses": {"200": {"description": "ok"}}}}}}
    document_responses(schema, api_key=False)
    assert set(schema["paths"]["/v1/models"]["get"]["responses"]) == {"200", "500"}
    assert "securitySchemes" not in schema["components"]


def test_tokenize_schema_and_behaviour_agree(served):
    _, ctx = served()
    with ctx as url:
        req = get(url, "/openapi.json").json()["components"]["schemas"]["TokenizeRequest"]
        assert {"required": ["prompt"]}.items() <= req["anyOf"][0].items()
        for body in ({}, {"prompt": None}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}):
            r = post(url, "/tokenize", body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", body
        assert post(url, "/tokenize", {"prompt": "a", "messages": None}).status_code == 200
        assert post(url, "/tokenize", {"messages": [{"role": "user", "content": "b"}]}).status_code == 200


def test_schemathesis_status_codes_content_types_and_positive_data(served):
    """Fuzz every operation (bounded, derandomised): each answer's status and Content-Type are documented;
    schema-valid data is accepted where the schema states the whole contract (/tokenize, /detokenize, GETs)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        positive_data_acceptance,
        status_code_conformance,
    )

    eng, ctx = served(lambda ids, p: ["a", "b"])
    with ctx as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        failures: list[str] = []

        def served_model(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            if case.path_parameters and "model_id" in case.path_parameters:
                case.path_parameters["model_id"] = MODEL
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = max(1, min(case.body["max_tokens"], 4))
            return case

        def make_check(op, mode):
            strategy = op.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                strategy = strategy.map(served_model)
            @settings(max_examples=12, deadline=None, database=None, phases=[Phase.generate], derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case):
                checks = [status_code_conformance, content_type_conformance]
                # the whole contract is in the schema for GETs, /detokenize and /tokenize of a prompt (chat
                # messages have encoder rules no schema states: a tool result must follow a tool call, ...)
                if mode is GenerationMode.POSITIVE and (
                        op.method.upper() == "GET" or op.path == "/detokenize"
                        or (op.path == "/tokenize" and isinstance(case.body, dict)
                                                 and isinstance(case.body.get("prompt"), str))):
                    checks.append(positive_data_acceptance)
                try:
                    case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10,
                                           checks=checks)
                except FailureGroup as e:
                    failures.append(f"{op.method.upper()} {op.path} [{mode.name}]: {str(e)[:300]}")
            return check

        for result in schema.get_all_operations():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    make_check(result.ok(), mode)()
                except Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE
        assert not failures, "\n".join(failures[:8])
        assert eng.in_flight == 0


def test_tokenizer_info_like_vllm_and_open_without_key(served, tokenizer):
    _, ctx = served()
    with ctx as url:
        r = get(url, "/tokenizer_info")  # no key sent: open like /health
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert info["bos_token"] == "<｜begin▁of▁sentence｜>" and info["eos_token"] == "<｜end▁of▁sentence｜>"
        assert info["pad_token"] == info["eos_token"] and info["add_bos_token"] is False
        assert info["model_max_length"] == 4096 and "chat_template" not in info
        # lm-eval's RemoteTokenizer: eos_token_id = encode(eos_token)[0] through /tokenize
        ids = post(url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
        assert ids == [tokenizer.eos_id]
        # the key is still required on /tokenize and /detokenize, also on sub-paths; not on look-alikes
        assert post(url, "/tokenize", {"prompt": "a"}, key=None).status_code == 401
        assert post(url, "/detokenize", {"tokens": [5]}, key=None).status_code == 401
        assert get(url, "/tokenize/x").status_code == 401
        assert get(url, "/tokenizerx").status_code == 404


def test_tokenizer_info_reads_the_checkpoint_config(scripted, live, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        '{"add_bos_token": false, "bos_token": {"__type": "AddedToken", "content": "<B>"}, "eos_token": "<E>", '
        '"model_max_length": 1048576, "tokenizer_class": "LlamaTokenizerFast", "vocab_file": "/x/vocab", '
        '"chat_template": "{{ messages }}"}')
    app = create_app(scripted(), ServerConfig(model_names=[MODEL], model_root=str(tmp_path)))
    with live(app) as url:
        info = get(url, "/tokenizer_info").json()
    assert info["bos_token"] == "<B>" and info["eos_token"] == "<E>" and info["pad_token"] == "<E>"
    assert info["tokenizer_class"] == "LlamaTokenizerFast" and info["model_max_length"] == 1048576
    assert info["chat_template"] == "{{ messages }}" and "vocab_file" not in info


@pytest.mark.parametrize("path, protected", [
    ("/v1/models", True), ("/v1", True), ("/v1x", False), ("/tokenize", True), ("/tokenize/", True),
    ("/tokenizer_info", False), ("/detokenize", True), ("/detokenizer", False), ("/health", False),
    ("/metrics", False), ("/openapi.json", False)])
def test_api_key_paths_match_whole_segments(path, protected):
    assert is_protected(path) is protected
