"""`transformers serve` behind a bearer-key check, as `vllm serve --api-key` runs: the tests' 401 server.

    python tests/keyed_server.py MODEL_DIR --host 127.0.0.1 --port P      (key: $MMLA_TEST_SERVER_KEY)

The app, model loading and every route are transformers' own; only requests under /v1 without the key are
answered 401 with the OpenAI error body.
"""

import json
import os
import sys

import uvicorn
from transformers.cli.serve import Serve

KEY = os.environ["MMLA_TEST_SERVER_KEY"].encode()
_Config = uvicorn.Config


def _keyed(app):
    async def guarded(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization") != b"Bearer " + KEY:
                body = json.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                             "code": "invalid_api_key"}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def main(argv: list[str]) -> None:
    model = argv[0] if argv and not argv[0].startswith("--") else None
    opts = dict(zip(argv[1::2], argv[2::2])) if model else dict(zip(argv[::2], argv[1::2]))
    # Serve builds its uvicorn.Config from the module attribute at call time: wrap the app there.
    uvicorn.Config = lambda app, **kw: _Config(_keyed(app), **kw)
    Serve(force_model=model, host=opts.get("--host", "127.0.0.1"), port=int(opts.get("--port", 8000)))


if __name__ == "__main__":
    main(sys.argv[1:])
