# sam-fast-serve: build the archive, run TorchServe on 127.0.0.1, segment images.
# Every step is a console command of the package (sam-fast-serve, sam-fast-client) run from .venv.
VENV         ?= .venv
BIN          := $(VENV)/bin
MODEL_NAME   ?= sam-fast
MODEL_CONFIG ?= model-config.yaml
# Default: checkpoints/<the file name model-config.yaml names>.
SAM_CHECKPOINT ?= checkpoints/$(shell $(BIN)/sam-fast-serve checkpoint-name --config $(MODEL_CONFIG) 2>/dev/null)
IMAGES       ?= out/samples
# The team server (make team-serve): the gateway's one listener, the only one beyond loopback, and
# this host's TorchServe behind it (config.properties' inference and management addresses).
TEAM_LISTEN    ?= 0.0.0.0:8000
INFERENCE_URL  ?= http://127.0.0.1:8080
MANAGEMENT_URL ?= http://127.0.0.1:8081
KEY_FILE       ?= key_file.json
TEAM_DIR       ?= $(shell $(BIN)/python -c 'from sam_fast_serve.tools.team import default_dir; print(default_dir())' 2>/dev/null)

# The real services tests start on 127.0.0.1 (Debian packages): the embedding store, metrics, and
# the gateways (nginx with its JavaScript module, which swaps the shared token for TorchServe's key);
# and jq, which the docs' curl examples use.
TEST_PACKAGES := redis-server prometheus nginx libnginx-mod-http-js jq
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test-services test lint archive serve team-serve team-stop stop demo smoke download samples bench

install:
	bash install_segment_anything_fast.sh

test-services:
	@missing=""; for pkg in $(TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (Debian packages the tests run)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends$$missing >/dev/null; fi

test: test-services
	$(BIN)/python -m pytest -q tests

# What CI checks after the tests: lint and format (ruff) everywhere, types (mypy) on the package.
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

download:
	$(BIN)/sam-fast-serve download --config $(MODEL_CONFIG) --dest $(SAM_CHECKPOINT)

# The weights are downloaded first when they are missing.
archive:
	@test -f $(SAM_CHECKPOINT) || $(MAKE) --no-print-directory download
	$(BIN)/sam-fast-serve archive --checkpoint $(SAM_CHECKPOINT) --config $(MODEL_CONFIG) \
		--handler custom_handler.py --export-path model_store --model-name $(MODEL_NAME)

# TorchServe on 127.0.0.1, left running (make stop ends it); the archive is built first when there is
# none (make archive rebuilds it after a config change).
serve:
	@test -f model_store/$(MODEL_NAME).tar.gz || $(MAKE) --no-print-directory archive
	@mkdir -p logs
	$(BIN)/torchserve --start --ncs --ts-config config.properties --model-store model_store \
		--models $(MODEL_NAME)=$(MODEL_NAME).tar.gz > logs/console.log 2>&1
	$(BIN)/sam-fast-serve wait-ready --model $(MODEL_NAME) --key-file key_file.json
	@echo "TorchServe is running: $(INFERENCE_URL)/predictions/$(MODEL_NAME) (token in key_file.json). Stop it with: make stop"

# One TorchServe for a team: started here (make serve) unless its management API listens already,
# READY, then nginx on TEAM_LISTEN checks the shared token $SAM_FAST_TEAM_TOKEN and passes requests on
# with TorchServe's own key. Laptops get the URL it prints and the token.
team-serve:
	@$(BIN)/python -c 'import socket, urllib.parse; url = urllib.parse.urlsplit("$(MANAGEMENT_URL)"); \
		socket.create_connection((url.hostname, url.port), timeout=5).close()' 2>/dev/null || $(MAKE) --no-print-directory serve
	@$(BIN)/sam-fast-serve wait-ready --model $(MODEL_NAME) --management-url $(MANAGEMENT_URL) --key-file $(KEY_FILE)
	$(BIN)/sam-fast-serve team --listen $(TEAM_LISTEN) --inference-url $(INFERENCE_URL) --key-file $(KEY_FILE) \
		--dir $(TEAM_DIR) --template deploy/nginx/team.conf --gateway-js deploy/kubernetes/gateway.js

team-stop:
	$(BIN)/sam-fast-serve team-stop --dir $(TEAM_DIR)

stop: team-stop
	-$(BIN)/torchserve --stop

samples:
	$(BIN)/sam-fast-serve samples out/samples

# The main job, end to end: real weights (downloaded if missing), archive, serve, segment, stop.
demo: samples
	$(MAKE) --no-print-directory archive serve
	$(BIN)/sam-fast-client $(IMAGES) --out out/demo --coco out/demo/coco.json; status=$$?; $(MAKE) --no-print-directory stop; exit $$status

# SMOKE MODE: random weights, a small grid, thresholds 0 and NMS off. Checks the plumbing only;
# the masks mean nothing.
smoke: samples
	$(BIN)/sam-fast-serve random-checkpoint checkpoints/random_vit_b.pth
	$(MAKE) --no-print-directory archive serve SAM_CHECKPOINT=checkpoints/random_vit_b.pth MODEL_CONFIG=tests/smoke-config.yaml
	$(BIN)/sam-fast-client $(IMAGES) --out out/smoke --coco out/smoke/coco.json; status=$$?; $(MAKE) --no-print-directory stop; exit $$status

bench:
	$(BIN)/python -m benchmarks.bench_engine
