# syntax=docker/dockerfile:1
#
# spool's container image: one statically linked binary on distroless
# "static" (no shell, no package manager, no libc: CA certificates, tzdata
# and a nonroot user only), running as that user with its log in /data.
#
#   docker build -t spool .
#   docker run -p 11300:11300 -p 11301:11301 -v spool-data:/data \
#       -e SPOOL_AUTH_TOKEN=... spool
#
# The build runs scripts/build-static.sh, the same script and flags the
# test command checks (scripts/check-deploy.sh), so what is tested static
# is what ships. Build context: .dockerignore leaves target/ out.

FROM rust:1.89-bookworm AS build
WORKDIR /src
RUN rustup target add x86_64-unknown-linux-musl
COPY . .
# The cache mounts keep the registry and the build between image builds;
# the binary is copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    binary="$(bash scripts/build-static.sh)" \
    && install -D -m 0755 "$binary" /out/usr/local/bin/spool \
    && install -d -m 0750 /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/usr/local/bin/spool /usr/local/bin/spool
# An empty /data owned by the runtime user: a new named volume is created
# with this owner, so spool can write its log without running as root.
COPY --from=build --chown=65532:65532 /out/data /data
# distroless's "nonroot" user, by number so no /etc/passwd lookup is needed.
USER 65532:65532
# Inside a container the listeners must face the pod network, not loopback.
# Set SPOOL_AUTH_TOKEN: /v1 and /admin are open without it.
ENV SPOOL_DATA_DIR=/data \
    SPOOL_LISTEN=0.0.0.0 \
    SPOOL_PORT=11300 \
    SPOOL_HTTP_LISTEN=0.0.0.0:11301 \
    SPOOL_LOG_FORMAT=json
VOLUME ["/data"]
# 11300: the beanstalkd protocol; 11301: HTTP (job API, probes, /metrics).
EXPOSE 11300 11301
# spool drains on SIGTERM (readiness false, puts refused, reserved jobs may
# finish for --shutdown-grace, 25 s by default); give it longer than that
# before the engine kills it (docker stop -t 30, Kubernetes
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/spool"]
CMD ["serve"]
