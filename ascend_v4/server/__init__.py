"""HTTP server: OpenAI- and Anthropic-compatible API with DeepSeek-V4 semantics over the runtime engine.

    from ascend_v4.server.app import create_app        # create_app(async_engine, ServerConfig(...))
    from ascend_v4.server.launch import ServeOptions, serve   # what `ascend-v4 serve` runs

Needs the `server` extra (fastapi, uvicorn, prometheus-client). Importing this package imports nothing heavy;
the modules above import FastAPI / the engine when they are imported. The contract is docs/serving.md.
"""
