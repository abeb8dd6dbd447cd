# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
.PHONY: demo test check lint typecheck unit contract integration e2e bench lock bootstrap images image browser bench-peers bench-stages clean

VENV := .venv/bin
PYTEST_ARGS ?=

bootstrap:
	./scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/drbot demo

# The Docker engine (started if none answers) and the local stand-ins for the drill images.
images:
	./scripts/images.sh

# drbot's own container image (drbot:dev), built with no network on a local Debian base.
image: bootstrap
	./scripts/image.sh

# Headless Chromium (Debian's) for the test that opens the HTML evidence report.
browser:
	./scripts/browser.sh

test: bootstrap images browser bench-peers check
	$(VENV)/pytest $(PYTEST_ARGS)

check: lint typecheck

lint:
	$(VENV)/ruff check drbot tests bench
	$(VENV)/ruff format --check drbot tests bench

typecheck:
	$(VENV)/mypy

unit contract integration e2e: bootstrap images browser
	$(VENV)/pytest tests/$@ $(PYTEST_ARGS)

# drbot against pgBackRest, pg_dump and the read + compress limit, in one run, then the RPO
# under a steady pgbench load; both append to docs/benchmarks.md. BENCH_SIZE (1.5GB; 10GB for
# the large run), BENCH_ROUNDS (3), BENCH_RPO_MINUTES (5).
bench: bootstrap bench-peers
	$(VENV)/python -m bench.compare
	$(VENV)/python -m bench.rpo --minutes $${BENCH_RPO_MINUTES:-5}

# The peers the benchmark runs (pgBackRest, a TLS proxy for it, zstd, GNU time).
bench-peers:
	./scripts/bench-peers.sh

# In-process stages (fingerprint, zstd, AES-GCM) and drbot against pg_dump alone (JSON lines).
bench-stages: bootstrap
	$(VENV)/python bench/backup_throughput.py $(BENCH_ROWS)

# Regenerate the lock files after changing dependencies in pyproject.toml.
lock:
	$(VENV)/pip-compile -q --no-emit-index-url --no-emit-find-links --generate-hashes --strip-extras --allow-unsafe -o requirements.lock pyproject.toml
	$(VENV)/pip-compile -q --no-emit-index-url --no-emit-find-links --generate-hashes --strip-extras --allow-unsafe --extra dev -o requirements-dev.lock pyproject.toml

clean:
	rm -rf .venv drbot-demo .mypy_cache .ruff_cache .pytest_cache
