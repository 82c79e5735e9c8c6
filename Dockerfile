# The image every run container starts from (`make image` -> geoiso-dagster:latest).
# Users with a registry build it unchanged; without one, scripts/image.sh passes a base
# made with debootstrap. The wheels come from the host (build/wheels): pip inside a build
# may not reach the index, apt does.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates libseccomp2 \
    && rm -rf /var/lib/apt/lists/*

# The dependencies first (a layer that changes only with them), then the project.
COPY build/wheels /tmp/wheels
RUN python3 -m venv /opt/geoiso \
    && /opt/geoiso/bin/pip install --no-cache-dir --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
COPY build/project /tmp/project
RUN /opt/geoiso/bin/pip install --no-cache-dir --no-index --no-deps /tmp/project/*.whl \
    && rm -rf /tmp/project \
    && /opt/geoiso/bin/python -c "import dagster_docker, dagster_postgres, geopandas, geoiso_dagster"

# A run container reads its instance from the run launcher's arguments; DAGSTER_HOME is
# for `dagster` commands run by hand in the image. HOME is writable for any user id the
# launcher runs the container as (it runs as the host user, so outputs are theirs).
COPY deploy/dagster.yaml /opt/dagster/dagster.yaml
ENV PATH=/opt/geoiso/bin:$PATH DAGSTER_HOME=/opt/dagster HOME=/tmp PYTHONUNBUFFERED=1
WORKDIR /tmp
