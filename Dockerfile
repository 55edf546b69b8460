# syntax=docker/dockerfile:1
# The Lichen host in a minimal, non-root image:
#   docker build -t lichen .
#   docker run -p 8080:8080 -p 7946:7946/udp -v lichen-data:/var/lib/lichen lichen
# Base images are pinned by digest; refresh them with
# `crane digest rust:1.95-bookworm` and
# `crane digest gcr.io/distroless/cc-debian12:nonroot`.

FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
WORKDIR /src
# The host and the crates it builds with; the guest functions (their own
# workspace) are not part of the image.
COPY Cargo.toml Cargo.lock ./
COPY core ./core
COPY host ./host
COPY sdk ./sdk
COPY bench ./bench
RUN cargo build --release --locked -p lichen-host --bin lichen \
    && install -D -m 0755 target/release/lichen /out/lichen \
    && install -d -m 0755 /out/data

# distroless cc (Debian 12, as the builder): glibc and CA certificates, no
# shell, no package manager; runs as nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
LABEL org.opencontainers.image.title="lichen" \
      org.opencontainers.image.description="A WebAssembly function host for the edge" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Lichen"
COPY --from=build /out/lichen /usr/local/bin/lichen
COPY --from=build --chown=65532:65532 /out/data /var/lib/lichen
USER 65532:65532
VOLUME ["/var/lib/lichen"]
# Settings as LICHEN_* variables, so a flag given to `docker run` (or a
# Kubernetes `args`) still wins; a --config file sits below both.
ENV LICHEN_DATA_DIR=/var/lib/lichen \
    LICHEN_POLICIES=/var/lib/lichen/policies \
    LICHEN_LISTEN=0.0.0.0:8080
# HTTP (functions and the admin API), gossip between peers.
EXPOSE 8080/tcp 7946/udp
ENTRYPOINT ["/usr/local/bin/lichen", "serve"]
