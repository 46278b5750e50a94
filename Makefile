# sam-fast-serve: build the archive, run TorchServe on 127.0.0.1, segment images.
# Every step is a console command of the package (sam-fast-serve, sam-fast-client) run from .venv:
# no need to activate it.
VENV         ?= .venv
BIN          := $(VENV)/bin
MODEL_NAME   ?= sam-fast
MODEL_CONFIG ?= model-config.yaml
# Default: checkpoints/<the file name model-config.yaml names>.
SAM_CHECKPOINT ?= checkpoints/$(shell $(BIN)/sam-fast-serve checkpoint-name --config $(MODEL_CONFIG) 2>/dev/null)
IMAGES       ?= out/samples
# This checkout's TorchServe keeps its pid file, temp files, logs and state here, so it never meets
# another TorchServe of this machine (make stop stops this one only).
RUN_DIR      ?= run
# Empty: config.properties' ports (inference 8080). PORT=9080 moves all five by as much.
PORT         ?=
# The client's --url for this checkout's server where PORT moved it.
CLIENT_URL   := $(if $(PORT),--url http://127.0.0.1:$(PORT))
# The team server (make team-serve): the gateway's one listener, the only one beyond loopback, in
# front of this checkout's TorchServe, or of one started elsewhere when MANAGEMENT_URL is given
# (with INFERENCE_URL and KEY_FILE).
TEAM_LISTEN    ?= 0.0.0.0:8000
MANAGEMENT_URL ?=
INFERENCE_URL  ?= http://127.0.0.1:8080
KEY_FILE       ?= key_file.json
TEAM_DIR       ?= $(shell $(BIN)/python -c 'from sam_fast_serve.tools.team import default_dir; print(default_dir())' 2>/dev/null)

# The real services tests start on 127.0.0.1 (Debian packages): the embedding store, metrics, and
# the gateways (nginx with its JavaScript module, which swaps the shared token for TorchServe's key);
# and jq, which the docs' curl examples use.
TEST_PACKAGES := redis-server prometheus nginx libnginx-mod-http-js jq
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test-services check test-unit test archive serve team-serve team-stop stop demo smoke download samples bench

install:
	bash install_segment_anything_fast.sh

test-services:
	@missing=""; for pkg in $(TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (Debian packages the tests run)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends$$missing >/dev/null; fi

# The fast lanes, seconds each: what CI runs first.
check:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-unit:
	$(BIN)/python -m pytest -q -m unit

# PYTEST_ARGS: more pytest options, e.g. -m "not unit" after make test-unit (CI), -k NAME, -x.
test: test-services
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)


download:
	$(BIN)/sam-fast-serve download --config $(MODEL_CONFIG) --dest $(SAM_CHECKPOINT)

# The weights are downloaded first when they are missing.
archive:
	@test -e $(SAM_CHECKPOINT) || $(MAKE) --no-print-directory download
	$(BIN)/sam-fast-serve archive --checkpoint $(SAM_CHECKPOINT) --config $(MODEL_CONFIG) \
		--handler custom_handler.py --export-path model_store --model-name $(MODEL_NAME)

# TorchServe on 127.0.0.1, left running (make stop ends it); the archive is built first when there is
# none (make archive rebuilds it after a config change). A start that fails says why.
serve:
	@test -f model_store/$(MODEL_NAME).tar.gz || $(MAKE) --no-print-directory archive
	@$(BIN)/sam-fast-serve start --run-dir $(RUN_DIR) --ts-config config.properties --model-store model_store \
		--models $(MODEL_NAME)=$(MODEL_NAME).tar.gz $(if $(PORT),--port $(PORT))

# One TorchServe for a team: this checkout's (make serve: started unless it runs already) or, with
# MANAGEMENT_URL, one started elsewhere; READY, then nginx on TEAM_LISTEN checks the shared token
# $SAM_FAST_TEAM_TOKEN and passes requests on with TorchServe's own key. Laptops get the URL it prints
# and the token.
team-serve:
ifeq ($(MANAGEMENT_URL),)
	@$(MAKE) --no-print-directory serve
	$(BIN)/sam-fast-serve team --listen $(TEAM_LISTEN) --run-dir $(RUN_DIR) \
		--dir $(TEAM_DIR) --template deploy/nginx/team.conf --gateway-js deploy/kubernetes/gateway.js
else
	@$(BIN)/sam-fast-serve wait-ready --model $(MODEL_NAME) --management-url $(MANAGEMENT_URL) --key-file $(KEY_FILE)
	$(BIN)/sam-fast-serve team --listen $(TEAM_LISTEN) --inference-url $(INFERENCE_URL) --key-file $(KEY_FILE) \
		--dir $(TEAM_DIR) --template deploy/nginx/team.conf --gateway-js deploy/kubernetes/gateway.js
endif

team-stop:
	$(BIN)/sam-fast-serve team-stop --dir $(TEAM_DIR)

stop: team-stop
	$(BIN)/sam-fast-serve stop --run-dir $(RUN_DIR)

samples:
	$(BIN)/sam-fast-serve samples out/samples

# The main job, end to end: real weights (downloaded if missing), archive, serve, segment, stop.
demo: samples
	$(MAKE) --no-print-directory archive serve
	$(BIN)/sam-fast-client $(IMAGES) --out out/demo --coco out/demo/coco.json $(CLIENT_URL); \
		status=$$?; $(MAKE) --no-print-directory stop; exit $$status

# SMOKE MODE: random weights, a small grid, thresholds 0 and NMS off. Checks the plumbing only;
# the masks mean nothing, and the banner and the overlays say so.
SMOKE_BANNER := SMOKE TEST: random weights, the masks are meaningless
smoke: samples
	@echo "*** $(SMOKE_BANNER) ***"
	$(BIN)/sam-fast-serve random-checkpoint checkpoints/random_vit_b.pth
	$(MAKE) --no-print-directory archive serve SAM_CHECKPOINT=checkpoints/random_vit_b.pth MODEL_CONFIG=tests/smoke-config.yaml
	@$(BIN)/sam-fast-client $(IMAGES) --out out/smoke --coco out/smoke/coco.json --overlay-banner "$(SMOKE_BANNER)" \
		$(CLIENT_URL); \
		status=$$?; $(MAKE) --no-print-directory stop; echo "*** $(SMOKE_BANNER) ***"; exit $$status

bench:
	$(BIN)/python -m benchmarks.bench_engine
