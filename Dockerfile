# The sandfleet application image: the gateway and every worker run from it.
#   docker build -t sandfleet .                                   # gateway, docker worker
#   docker build --build-arg SANDFLEET_EXTRAS=nvml -t sandfleet:gpu .   # + NVML GPU discovery
FROM python:3.11-slim

# Optional extras, comma-separated (pyproject's optional-dependencies): `nvml` for a
# worker that finds its GPUs through NVML. `vm` needs libvirt's C headers to build, and
# a VM worker runs beside libvirtd on the host (deploy/systemd), not in this image.
ARG SANDFLEET_EXTRAS=

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY common ./common
COPY gateway ./gateway
COPY workers ./workers
RUN pip install --no-cache-dir ".${SANDFLEET_EXTRAS:+[$SANDFLEET_EXTRAS]}"

# An unprivileged user of its own. The directories a worker writes are made here, owned by
# it, so that a fresh named volume mounted on them starts out as the user's (the claim
# store and journal refuse a directory another user owns). A Docker worker still needs
# the Docker socket's group (compose: `group_add`), which is as good as root on the host.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent sandfleet \
    && install -d -o sandfleet -g sandfleet -m 0700 \
        /run/sandfleet /var/lib/sandfleet/journal /var/lib/sandfleet/gateway
USER sandfleet

ENTRYPOINT ["sandfleet"]
