# One place for the everyday commands. Everything runs from the project's own venv (.venv).
PY      := .venv/bin/python
BUF_VER := 1.75.0
BUF     := .tools/node_modules/.bin/buf

.PHONY: setup up demo test lint protos bench bench-inference clean

# Install the project with its dev/gateway/training extras (re-run when pyproject.toml changes).
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,gateway,training]'
	# tritonclient, the stock KServe V2 client the inference tests drive, pins protobuf<7 in its
	# metadata; its generated code runs on the protobuf 7 runtime (tests/inference show it), so
	# it is installed without its dependency pins.
	$(PY) -m pip install -q --no-deps tritonclient==2.73.0 python-rapidjson==1.25
	touch $@

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VER)

setup: .venv/.installed $(BUF)

# Run the platform locally on embedded defaults (SQLite, local artifacts, Envoy on :8080) with the demo.
# Extra `strata up` arguments go in ARGS, e.g. make up ARGS="--gateway-port 8081 --no-auth".
up: .venv/.installed
	.venv/bin/strata up --demo $(ARGS)

# The demo against an already running platform.
demo: .venv/.installed
	.venv/bin/strata demo

# Regenerate the Python stubs (gen/python/) and the gateway descriptor set (gateway/strata.pb) from protos/
protos: .venv/.installed
	$(PY) scripts/genproto.py

# Contracts: buf lint, and the committed generated code must match protos/.
lint: setup
	$(BUF) lint
	$(PY) scripts/genproto.py --check

# The whole test suite (what CI runs).
test: lint
	$(PY) -m pytest -q

# Benchmarks (pytest-benchmark); figures go to docs/performance.md by hand, with this command.
bench: .venv/.installed
	$(PY) -m pytest tests/bench --benchmark-enable --benchmark-only -q -p no:randomly

# Load benchmark of the inference service (h2load from Debian's nghttp2-client, tritonclient,
# Predict, REST through Envoy); figures in docs/performance.md.
bench-inference: .venv/.installed
	$(PY) -m tests.bench.inference_load --seconds 8

clean:
	rm -rf .venv .tools .strata
