# Build: `docker build -t tagflow:0.1.0 .` (not buildable on the project's
# CI machines, which have no Docker engine).
#
# The eBPF toolchain is installed by `cargo xtask bootstrap`, the same
# command a developer's first `cargo xtask ...` runs: nightly rust-src,
# llvm-22-dev, bpf-linker built for LLVM 22.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN rustup toolchain install nightly --profile minimal \
 && cargo xtask bootstrap \
 && cargo build --release --package tagflow --bin tagflow

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tagflow /usr/local/bin/tagflow
ENTRYPOINT ["/usr/local/bin/tagflow"]
