//! `crds/` and the chart's `charts/skein/crds/` are generated from the Rust types; this fails
//! when someone changed one without the others (run `make generate`).
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

#[test]
fn crds_match_the_rust_types() {
    let root =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..");
    let mut stale = Vec::new();
    for dir in ["crds", "charts/skein/crds"] {
        let generated: Vec<&str> = skein_operator::crdgen::crds().iter().map(|(file, _)| *file).collect();
        for (file, crd) in skein_operator::crdgen::crds() {
            let on_disk = std::fs::read_to_string(root.join(dir).join(file)).unwrap_or_default();
            if on_disk != skein_operator::crdgen::render(&crd) {
                stale.push(format!("{dir}/{file}"));
            }
        }
        // Nothing else in there either: a CRD removed from the types leaves no file behind.
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if !generated.contains(&name.as_str()) {
                stale.push(format!("{dir}/{name} (not generated)"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated CRDs differ from the types: {stale:?}: run `make generate` and commit them"
    );
}

#[test]
fn every_crd_has_status_printer_columns_and_a_short_name() {
    for (file, crd) in skein_operator::crdgen::crds() {
        let version = &crd.spec.versions[0];
        assert!(
            version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{file}: status subresource"
        );
        let columns: Vec<&str> =
            version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert!(
            columns.contains(&"Accepted") && columns.contains(&"Programmed") && columns.contains(&"Age"),
            "{file}: {columns:?}"
        );
        assert_eq!(crd.spec.names.short_names.as_ref().map(Vec::len), Some(1), "{file}: short name");
    }
}

/// Every property in the schema carries a description (from the `///` docs), so that
/// `kubectl explain` reads well.
#[test]
fn every_spec_field_is_documented() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                if prop.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, prop, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    for (file, crd) in skein_operator::crdgen::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        let mut missing = Vec::new();
        walk("spec", spec, &mut missing);
        assert!(missing.is_empty(), "{file}: undocumented fields {missing:?}");
    }
}
