# drbot as a container: the daemon by default, any drbot command otherwise.
#
#   scripts/image.sh                       # here: wheels + a local base, then the build below
#   docker build --network none --build-arg BASE=drbot-base:bookworm-pg15 -t drbot:dev .
#
# The build context holds only wheels (build/wheels, made by scripts/image.sh from the
# hash-pinned requirements.lock plus drbot's own wheel) and the lock file: installing Python
# packages needs no network. The operating-system packages come from the base image: a base
# that already has them (scripts/image.sh builds one with mmdebstrap) needs no network either;
# any other base (the default, debian:bookworm-slim) gets them from its apt sources.
#
# Build arguments:
#   BASE         the Debian 12 image to build on (default debian:bookworm-slim)
#   PG_MAJOR     PostgreSQL major version of the client tools (and server binaries), 15
#   WITH_SERVER  1 adds the PostgreSQL server binaries (postgresql-$PG_MAJOR) so drills can use
#                `drill.sandbox: process` without a Docker socket (about 235 MB more: the
#                server package brings LLVM for its JIT)
# Nothing BuildKit-only (no RUN --mount, no heredocs): Docker's legacy builder builds it too.

ARG BASE=debian:bookworm-slim

# ---- runtime: the operating system drbot runs on (also where the deps stage starts) ---------
FROM ${BASE} AS runtime
ARG PG_MAJOR=15
ARG WITH_SERVER=0
# Keep this list in step with scripts/image.sh (the local base it builds). The user is fixed and
# numeric: Kubernetes' runAsNonRoot can only check a numeric USER.
RUN set -eu; \
    pkgs="python3 python3-venv ca-certificates postgresql-client-${PG_MAJOR}"; \
    if [ "${WITH_SERVER}" = 1 ]; then pkgs="${pkgs} postgresql-${PG_MAJOR}"; fi; \
    missing=""; \
    for p in ${pkgs}; do \
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] \
            || missing="${missing} $p"; \
    done; \
    if [ -n "${missing}" ]; then \
        echo "base lacks:${missing}; installing them from its apt sources"; \
        mkdir -p /etc/postgresql-common/createcluster.d; \
        echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/drbot.conf; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing}; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    grep -q '^drbot:' /etc/group || echo 'drbot:x:10001:' >>/etc/group; \
    grep -q '^drbot:' /etc/passwd \
        || echo 'drbot:x:10001:10001:drbot:/var/lib/drbot:/usr/sbin/nologin' >>/etc/passwd; \
    mkdir -p /var/lib/drbot /etc/drbot/policies; \
    chown 10001:10001 /var/lib/drbot; \
    chmod 0750 /var/lib/drbot

# ---- deps: a virtualenv with every dependency, offline and hash-checked -------------------------
# (reused from Docker's cache until requirements.lock changes)
FROM runtime AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1
RUN python3 -m venv /opt/drbot
COPY requirements.lock /wheels/requirements.lock
COPY build/wheels/deps/ /wheels/deps/
RUN /opt/drbot/bin/pip install --no-index --find-links /wheels/deps \
        --require-hashes --only-binary=:all: -r /wheels/requirements.lock \
    && /opt/drbot/bin/pip uninstall -q -y pip setuptools

# ---- the image: runtime + the virtualenv + drbot ------------------------------------------------
FROM runtime
ARG PG_MAJOR=15
COPY --from=deps /opt/drbot /opt/drbot
# drbot itself last, so a changed checkout rebuilds only this small layer. The virtualenv has no
# pip; Debian's pip wheel (python3-venv) runs from the wheel file, and is not installed either.
COPY build/wheels/drbot/ /tmp/drbot-wheel/
RUN set -eu; \
    pip="$(ls /usr/share/python-wheels/pip-*.whl)/pip"; \
    /opt/drbot/bin/python "$pip" install -q --no-index --no-deps --no-cache-dir \
        --disable-pip-version-check /tmp/drbot-wheel/drbot-*.whl; \
    /opt/drbot/bin/python "$pip" check --disable-pip-version-check; \
    rm -rf /tmp/drbot-wheel
ENV PATH=/opt/drbot/bin:/usr/lib/postgresql/${PG_MAJOR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    DRBOT_STATE_DIR=/var/lib/drbot \
    DRBOT_POLICIES=/etc/drbot/policies \
    DRBOT_HTTP=0.0.0.0:9187
USER 10001:10001
WORKDIR /var/lib/drbot
EXPOSE 9187
# No curl in the image: python's urllib asks the daemon's /healthz on DRBOT_HTTP's port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('DRBOT_HTTP', '0.0.0.0:9187').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["drbot"]
CMD ["daemon"]
