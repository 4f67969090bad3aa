"""The pool on its own, at http://127.0.0.1:8000/v1 (what `local-inference-pool serve` does).

LIP_BACKENDS=http://127.0.0.1:8080,http://127.0.0.1:8081 python examples/standalone.py
"""

import uvicorn

from local_inference_pool import create_standalone_app, load_config

app = create_standalone_app(load_config())  # the file in $LIP_CONFIG, then LIP_* variables

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8000)
