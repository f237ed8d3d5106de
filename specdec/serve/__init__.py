"""OpenAI-compatible server for speculative decoding (`python -m specdec.serve`).

    from specdec.serve import ServeConfig, create_app
    app = create_app(ServeConfig(target="smollm2-135m-instruct", draft="runs/x/sd-draft", k=4))

`create_app(config, engine=None, tokenizer=None)` builds a FastAPI app with its own engine
worker thread and Prometheus registry (nothing global); `run(config)` serves it with uvicorn;
`running_server(app)` serves one on a free loopback port in a thread (tests, benchmarks).
"""

from specdec.serve.app import create_app
from specdec.serve.cli import main, run
from specdec.serve.config import ServeConfig, build_engine
from specdec.serve.server import running_server

__all__ = ["ServeConfig", "build_engine", "create_app", "main", "run", "running_server"]
