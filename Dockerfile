# syntax=docker/dockerfile:1
# Skein's images for those who build with Docker (or podman, buildah):
#   docker build --target operator -t ghcr.io/skein-mesh/skein-operator:0.1.0 .
#   docker build --target proxy    -t ghcr.io/skein-mesh/skein-proxy:0.1.0 .
#   docker build --target demo-app -t ghcr.io/skein-mesh/skein-demo-app:0.1.0 .
# The project's own CI has no container daemon and builds the same images with `make images`
# (images/build.py): this file is kept plain and is not run there.
ARG VERSION=0.1.0

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p skein-operator -p skein-proxy --bins \
 && cargo build --release --locked -p skein-demo --example demo-app \
 && mkdir /out \
 && cp target/release/skein-operator target/release/skein-proxy target/release/examples/demo-app /out/ \
 && strip /out/*

# iptables (nf_tables variant) for the capture init step, under the names skein-proxy calls.
FROM docker.io/library/debian:bookworm-slim AS iptables
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
 && mkdir -p /stage/usr/sbin /stage/lib/x86_64-linux-gnu /stage/usr/lib/x86_64-linux-gnu/xtables \
 && cp /usr/sbin/xtables-nft-multi /stage/usr/sbin/ \
 && for n in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do \
      ln -s xtables-nft-multi /stage/usr/sbin/$n; done \
 && cp -L /lib/x86_64-linux-gnu/libxtables.so.12 /lib/x86_64-linux-gnu/libmnl.so.0 \
      /lib/x86_64-linux-gnu/libnftnl.so.11 /stage/lib/x86_64-linux-gnu/ \
 && for e in standard tcp udp owner REDIRECT comment mark MARK; do \
      cp /usr/lib/x86_64-linux-gnu/xtables/libxt_$e.so /stage/usr/lib/x86_64-linux-gnu/xtables/; done

# distroless/cc: glibc, libgcc, /etc/passwd with nonroot (65532); no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
ARG VERSION
LABEL org.opencontainers.image.title="Skein operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/skein-mesh/skein" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/skein-operator /usr/local/bin/skein-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/skein-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS proxy
ARG VERSION
LABEL org.opencontainers.image.title="Skein proxy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/skein-mesh/skein" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=iptables /stage/ /
COPY --from=build /out/skein-proxy /usr/local/bin/skein-proxy
# The UID transparent capture lets through (the init step runs as root with NET_ADMIN).
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/skein-proxy"]

FROM gcr.io/distroless/cc-debian12:nonroot AS demo-app
ARG VERSION
LABEL org.opencontainers.image.title="Skein demo app" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/skein-mesh/skein" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/demo-app /usr/local/bin/demo-app
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/demo-app"]
