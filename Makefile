# kamsync — `make help` lists the targets.
SHELL := /bin/bash
PORT ?= 6390
CARGO ?= cargo

.PHONY: help setup build run test unit lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## fetch servers and build tools into .deps/ (idempotent; needs root for apt)
	@bash scripts/setup.sh

build: setup ## build target/release/libkamsync.so
	$(CARGO) build --release

run: build ## start Redis 7.4 + RedisJSON + kamsync from redis.conf.example on port $(PORT)
	@bash scripts/run.sh $(PORT)

test: build ## build, then run every test (unit and integration, all servers, Kamailio)
	$(CARGO) test --release -- --test-threads=4
	@if [ -e .deps/kamailio-unavailable ]; then \
	    echo "*** SKIPPED: the Kamailio end-to-end tests did not run: $$(cat .deps/kamailio-unavailable)"; fi

unit: ## only the unit tests (no servers)
	$(CARGO) test --release --lib

bench: build ## kamsync vs bare Redis, as ratios; writes bench-results/latest.md (minutes)
	$(CARGO) bench --bench kamsync

lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

clean: ## remove build output and the run directory (keeps .deps/)
	$(CARGO) clean
	rm -rf .run
