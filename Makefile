# Every check CI runs is a target here. `make test` runs unit tests and, when KUBECONFIG names a
# cluster, the end-to-end tests against it.
CARGO ?= cargo

.PHONY: build test unit e2e generate lint fuzz run demo bench bench-mesh bench-control-plane images

build:
	$(CARGO) build --workspace --bins --examples

# The e2e tests start the real binaries, so build them first; with a cluster, the install test
# also runs the images.
test: build
	@if [ -n "$$KUBECONFIG" ]; then $(MAKE) --no-print-directory images; \
	 else echo "note: KUBECONFIG is not set, so the e2e tests skip (they need a cluster)"; fi
	$(CARGO) test --workspace

unit:
	$(CARGO) test --workspace --exclude skein-e2e

e2e: build images
	$(CARGO) test -p skein-e2e

# The CRDs, from the Rust types: for kubectl users (crds/) and in the chart (charts/skein/crds/).
generate:
	$(CARGO) run -q --bin crdgen -- --out crds
	$(CARGO) run -q --bin crdgen -- --out charts/skein/crds

lint:
	python3 .ci/module_cycles.py api http2 operator sidecar bench demo e2e
	$(CARGO) fmt --all --check
	$(CARGO) fmt --check --manifest-path fuzz/Cargo.toml
	$(CARGO) metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if command -v helm >/dev/null 2>&1; then \
	  helm lint --strict charts/skein && helm template skein charts/skein -n skein-system >/dev/null; \
	 else echo "note: helm is not installed, so the chart is not linted (.ci/install_helm.py)"; fi

# Container images as OCI archives, without a container daemon (images/build.py): skein-operator,
# skein-proxy and skein-demo-app in $(TARGET_DIR)/images/, from release builds. Load them with
# `kind load image-archive`, `docker load`, or push them with skopeo. IMAGE_REGISTRY and
# IMAGE_TAG name them (ghcr.io/skein-mesh, the workspace version).
TARGET_DIR = $${CARGO_TARGET_DIR:-target}
images:
	$(CARGO) build --release -p skein-operator -p skein-proxy --bins
	$(CARGO) build --release -p skein-demo --example demo-app
	SKEIN_IMAGE_REGISTRY=$(IMAGE_REGISTRY) SKEIN_IMAGE_TAG=$(IMAGE_TAG) \
	  python3 images/build.py --bin-dir $(TARGET_DIR)/release --out $(TARGET_DIR)/images

# Every fuzz target under libFuzzer for FUZZ_SECONDS (default 60) each; see fuzz/run.sh. A
# finding fails the run and is left in fuzz/artifacts/<target>/.
fuzz:
	bash fuzz/run.sh

# The control plane against the cluster in KUBECONFIG (CRDs installed first).
run: build generate
	kubectl apply --server-side -f crds/
	$(CARGO) run --bin skein-operator -- --namespace $${POD_NAMESPACE:-default}

# The mesh on one machine: control plane, a canary of two versions, sidecars with mTLS and a
# client, all on loopback, with a live summary. Edit examples/canary/*.yaml while it runs;
# Ctrl-C stops everything. Release builds, so the latencies shown are the mesh's own
# (DEMO_PROFILE=dev reuses the test build); DEMO_ARGS passes flags (`skein-demo --help`).
DEMO_PROFILE ?= release
demo:
	$(CARGO) build --profile $(DEMO_PROFILE) -p skein-operator -p skein-proxy -p skein-demo --bins --examples
	$(CARGO) run -q --profile $(DEMO_PROFILE) -p skein-demo -- $(DEMO_ARGS)

# The data-plane benchmark: skein-proxy next to Envoy, HAProxy and nginx on loopback (about
# 10 minutes; RUNS, RATES, DURATION, TARGETS tune it, see bench/run.sh). Writes bench/RESULTS.md.
bench:
	$(CARGO) build --release -p skein-proxy -p skein-bench -p skein-identity-bench -p skein-authz-bench
	bash bench/run.sh
	taskset -c 0 $${CARGO_TARGET_DIR:-target}/release/identity-bench
	taskset -c 0 $${CARGO_TARGET_DIR:-target}/release/authz-bench

# The mesh-path benchmark: client → proxy A → TLS 1.3 → proxy B → upstream, for a skein-proxy
# pair (and one with --workers 2), an Envoy pair configured as Istio would and an HAProxy pair,
# with an HTTP/1.1 client and then an HTTP/2 one (about 25 minutes; the knobs of bench/run.sh).
# Writes its two sections of bench/RESULTS.md.
MESH_TARGETS ?= direct skein-mtls envoy-mtls haproxy-tls skein-mtls-2w
bench-mesh:
	$(CARGO) build --release -p skein-proxy -p skein-bench
	TARGETS="$(MESH_TARGETS)" SECTION=mesh-http1 bash bench/run.sh
	TARGETS="$(MESH_TARGETS)" SECTION=mesh-http2 HTTP2=1 bash bench/run.sh

# The control-plane benchmark: one skein-operator (core 0) fed a synthetic cluster of 1,000
# Services from files, and 100, 1,000 and 5,000 simulated proxies over mTLS (core 1): cold start
# and the time from each change to every acknowledgement (about 3 minutes; PROXIES, CHANGES tune
# it); then skein-proxy's memory with the config of a workload scoped to 10 of the Services, and
# with all of them. Prints a Markdown table; bench/RESULTS.md holds the method and a run.
PROXIES ?= 100,1000,5000
CHANGES ?= 5
bench-control-plane:
	$(CARGO) build --release -p skein-operator -p skein-proxy -p skein-control-plane-bench
	taskset -c 1 $${CARGO_TARGET_DIR:-target}/release/control-plane-bench \
	  --operator $${CARGO_TARGET_DIR:-target}/release/skein-operator --operator-cpu 0 \
	  --proxies $(PROXIES) --changes $(CHANGES)
	@if [ -n "$$KUBECONFIG" ]; then \
	  taskset -c 1 $${CARGO_TARGET_DIR:-target}/release/control-plane-bench --cluster \
	    --operator $${CARGO_TARGET_DIR:-target}/release/skein-operator --operator-cpu 0 \
	    --proxies $(PROXIES) --changes $(CHANGES); \
	 else echo "note: KUBECONFIG is not set, so the watch path (--cluster) is not measured"; fi
	$${CARGO_TARGET_DIR:-target}/release/control-plane-bench \
	  --proxy-rss $${CARGO_TARGET_DIR:-target}/release/skein-proxy
