//! The synthetic cluster: namespaces of Services, each with its pods (one service account per
//! Service, so one identity per workload), an EndpointSlice and, for the first few of each
//! namespace, a canary TrafficRoute. Written as ordinary manifests, one file per kind and
//! namespace, so a change rewrites one small file.

use std::fmt::Write as _;
use std::path::Path;

/// The synthetic namespaces' names start with this; on an API server they also carry
/// [`BENCH_LABEL`], and the benchmark touches no namespace without it.
pub const NAMESPACE_PREFIX: &str = "skein-cpb-";

/// The label (`key=value`) on every namespace the benchmark creates.
pub const BENCH_LABEL: (&str, &str) = ("skein.dev/bench", "control-plane");

/// The cluster's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub namespaces: usize,
    pub services_per_namespace: usize,
    pub endpoints_per_service: usize,
    pub routes: usize,
}

impl Shape {
    pub fn services(&self) -> usize {
        self.namespaces * self.services_per_namespace
    }

    /// The name of namespace `ns` (index).
    pub fn namespace(&self, ns: usize) -> String {
        format!("{NAMESPACE_PREFIX}{ns:02}")
    }

    /// The namespace and name of Service `i` (its service account has the same name).
    pub fn service(&self, i: usize) -> (String, String) {
        (
            self.namespace(i / self.services_per_namespace),
            format!("svc-{:03}", i % self.services_per_namespace),
        )
    }

    /// How many of each namespace's Services have a route.
    fn routes_per_namespace(&self) -> usize {
        self.routes.div_ceil(self.namespaces)
    }
}

/// What can change between two writes of the manifests.
#[derive(Clone, Debug, Default)]
pub struct Edits {
    /// Service index → the v1 weight of its canary route (90 unless changed).
    pub weights: std::collections::BTreeMap<usize, u32>,
    /// Service index → endpoints added to its slice (no pod behind them).
    pub extra_endpoints: std::collections::BTreeMap<usize, usize>,
    /// (Service index, pod number) deleted, with its endpoint.
    pub deleted_pods: std::collections::BTreeSet<(usize, usize)>,
    /// Namespace index → its `skein.dev/destinations` annotation.
    pub scopes: std::collections::BTreeMap<usize, String>,
}

fn address(shape: &Shape, i: usize, n: usize) -> String {
    // 10.<namespace>.<service>.<endpoint>, with room for 250 endpoints per Service.
    let ns = i / shape.services_per_namespace;
    let svc = i % shape.services_per_namespace;
    format!("10.{}.{}.{}", ns, svc, n + 1)
}

/// The files of namespace `ns` (index), as (file name, YAML).
pub fn namespace_files(shape: &Shape, ns: usize, edits: &Edits, node: Option<&str>) -> Vec<(String, String)> {
    let first = ns * shape.services_per_namespace;
    let services = first..first + shape.services_per_namespace;
    let namespace = shape.namespace(ns);
    let (mut svcs, mut pods, mut slices, mut routes) =
        (String::new(), String::new(), String::new(), String::new());
    let annotations = match edits.scopes.get(&ns) {
        Some(scope) => format!(", annotations: {{skein.dev/destinations: \"{scope}\"}}"),
        None => String::new(),
    };
    let (key, value) = BENCH_LABEL;
    let _ = writeln!(
        svcs,
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}, labels: {{{key}: {value}}}{annotations}}}\n---"
    );
    for i in services {
        let (_, name) = shape.service(i);
        let _ = writeln!(
            svcs,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{ports: [{{name: http, port: 8080, targetPort: 8080}}]}}\n---"
        );
        let _ = writeln!(
            svcs,
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {namespace}}}\n---"
        );
        let mut endpoints = String::new();
        for n in 0..shape.endpoints_per_service {
            if edits.deleted_pods.contains(&(i, n)) {
                continue;
            }
            let version = if n % 2 == 0 { "v1" } else { "v2" };
            let node_line = node.map(|node| format!(", nodeName: {node}")).unwrap_or_default();
            let _ = writeln!(
                pods,
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-{n}, namespace: {namespace}, labels: {{app: {name}, version: {version}, skein.dev/inject: enabled}}}}\nspec: {{serviceAccountName: {name}{node_line}, containers: [{{name: app, image: example.invalid/app:1}}]}}\n---"
            );
            let _ = write!(
                endpoints,
                "{{addresses: [\"{}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {name}-{n}, namespace: {namespace}}}}}, ",
                address(shape, i, n)
            );
        }
        for n in 0..edits.extra_endpoints.get(&i).copied().unwrap_or(0) {
            let _ = write!(
                endpoints,
                "{{addresses: [\"{}\"], conditions: {{ready: true}}}}, ",
                address(shape, i, shape.endpoints_per_service + n)
            );
        }
        let _ = writeln!(
            slices,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n---",
            endpoints.trim_end_matches(", ")
        );
        if i - first < shape.routes_per_namespace() && i < shape.routes_at(ns) {
            let v1 = edits.weights.get(&i).copied().unwrap_or(90);
            let _ = writeln!(
                routes,
                "apiVersion: skein.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  host: {name}\n  port: 8080\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n  rules:\n    - backends: [{{subset: v1, weight: {v1}}}, {{subset: v2, weight: {}}}]\n---",
                100 - v1
            );
        }
    }
    [("services", svcs), ("pods", pods), ("slices", slices), ("routes", routes)]
        .into_iter()
        .filter(|(_, text)| !text.is_empty())
        .map(|(kind, text)| (format!("{namespace}-{kind}.yaml"), text))
        .collect()
}

impl Shape {
    /// One past the last Service index of namespace `ns` that may have a route (the routes are
    /// spread over the namespaces, `routes` in all).
    fn routes_at(&self, ns: usize) -> usize {
        let per = self.routes_per_namespace();
        let before = (ns * per).min(self.routes);
        let here = per.min(self.routes - before);
        ns * self.services_per_namespace + here
    }

    /// The Services with a route, by index.
    pub fn routed(&self) -> Vec<usize> {
        (0..self.namespaces)
            .flat_map(|ns| {
                let first = ns * self.services_per_namespace;
                first..self.routes_at(ns).min(first + self.routes_per_namespace())
            })
            .collect()
    }
}

/// Writes every namespace's files into `dir`.
pub fn write_all(shape: &Shape, dir: &Path, edits: &Edits, node: Option<&str>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for ns in 0..shape.namespaces {
        for (name, text) in namespace_files(shape, ns, edits, node) {
            std::fs::write(dir.join(name), text)?;
        }
    }
    Ok(())
}

/// Rewrites the files of the namespace of Service `i` that differ (atomically: a temp file,
/// then rename, so the operator never reads half a file). Returns the files written.
/// Returns the files written and when the first of them appeared (the change's start: the
/// texts are made and compared before it).
pub fn rewrite_namespace_of(
    shape: &Shape,
    dir: &Path,
    i: usize,
    edits: &Edits,
    node: Option<&str>,
) -> anyhow::Result<(Vec<String>, Option<std::time::Instant>)> {
    let ns = i / shape.services_per_namespace;
    let mut written = Vec::new();
    let mut first = None;
    for (name, text) in namespace_files(shape, ns, edits, node) {
        let path = dir.join(&name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &text)?;
        first.get_or_insert_with(std::time::Instant::now);
        std::fs::rename(tmp, &path)?;
        written.push(name);
    }
    Ok((written, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_is_what_it_says() {
        let shape =
            Shape { namespaces: 20, services_per_namespace: 50, endpoints_per_service: 10, routes: 100 };
        assert_eq!(shape.services(), 1000);
        assert_eq!(shape.routed().len(), 100);
        let files = namespace_files(&shape, 3, &Edits::default(), None);
        let text: String = files.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(text.matches("kind: Service\n").count(), 50);
        assert_eq!(text.matches("kind: Pod\n").count(), 500);
        assert_eq!(text.matches("kind: TrafficRoute\n").count(), 5);
        assert_eq!(text.matches("conditions: {ready: true}").count(), 500);
    }
}
