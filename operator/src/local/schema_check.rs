//! Structural validation of a manifest against the CRD's own OpenAPI schema, for the local
//! control plane: types, required fields, ranges, lengths, patterns, enums and list sizes, with
//! the API server's way of naming the field (`spec.rules[0].timeout: ...`). The CEL rules are
//! checked by the computation itself (see `compute`), so together they refuse what the API
//! server refuses.

use serde_json::Value;

/// Checks `value` against `schema`, appending one message per problem.
pub fn check(value: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            errors.push(format!("{path}: Required value"));
        }
        return;
    }
    let kind = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let type_ok = match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        errors.push(format!("{path}: Invalid value: {value}: must be of type {kind}"));
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            let names: Vec<String> = options.iter().filter(|o| !o.is_null()).map(|o| o.to_string()).collect();
            errors
                .push(format!("{path}: Unsupported value: {value}: supported values: {}", names.join(", ")));
        }
    }
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    if let Some(n) = value.as_f64() {
        if let Some(max) = bound("maximum").filter(|m| n > *m) {
            errors.push(format!("{path}: Invalid value: {value}: must be less than or equal to {max}"));
        }
        if let Some(min) = bound("minimum").filter(|m| n < *m) {
            errors.push(format!("{path}: Invalid value: {value}: must be greater than or equal to {min}"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as f64;
        if let Some(max) = bound("maxLength").filter(|m| len > *m) {
            errors.push(format!("{path}: Too long: may not be longer than {max}"));
        }
        if let Some(min) = bound("minLength").filter(|m| len < *m) {
            errors.push(format!("{path}: Invalid value: {value}: should be at least {min} chars long"));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            if regex::Regex::new(pattern).is_ok_and(|re| !re.is_match(s)) {
                errors.push(format!("{path}: Invalid value: {value}: should match '{pattern}'"));
            }
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as f64;
        if let Some(max) = bound("maxItems").filter(|m| len > *m) {
            errors.push(format!("{path}: Too many: {len}: must have at most {max} items"));
        }
        if let Some(min) = bound("minItems").filter(|m| len < *m) {
            errors.push(format!("{path}: Invalid value: {len}: should have at least {min} items"));
        }
        if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    errors.push(format!("{path}[{i}]: Duplicate value: {item}"));
                }
            }
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item, item_schema, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(map) = value.as_object() {
        if let Some(max) = bound("maxProperties").filter(|m| map.len() as f64 > *m) {
            errors.push(format!("{path}: Too many: {}: must have at most {max} items", map.len()));
        }
        for required in
            schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
        {
            if !map.contains_key(required) {
                errors.push(format!("{path}.{required}: Required value"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties").filter(|a| a.is_object());
        for (key, v) in map {
            match (properties.and_then(|p| p.get(key)), additional) {
                (Some(s), _) | (None, Some(s)) => check(v, s, &format!("{path}.{key}"), errors),
                // Unknown fields are pruned by the API server; so they are ignored here.
                (None, None) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ranges_patterns_enums_and_required_fields_name_the_field() {
        let schema = json!({"type": "object", "required": ["host"], "properties": {
            "host": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535, "nullable": true},
            "method": {"type": "string", "enum": ["GET", "POST"]},
            "rules": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 0}}}}
        }});
        let mut errors = Vec::new();
        check(
            &json!({"host": "Bad_Host", "port": 70000, "method": "FETCH", "rules": [{"w": -1}]}),
            &schema,
            "spec",
            &mut errors,
        );
        let text = errors.join("\n");
        for expected in [
            "spec.host: Invalid value",
            "spec.host: Too long",
            "spec.port: Invalid value: 70000",
            "spec.method: Unsupported value",
            "spec.rules[0].w",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
        let mut errors = Vec::new();
        check(&json!({"rules": []}), &schema, "spec", &mut errors);
        assert!(errors.iter().any(|e| e == "spec.host: Required value"));
        assert!(errors.iter().any(|e| e.starts_with("spec.rules: Invalid value: 0")));
    }
}
