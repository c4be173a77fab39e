//! Where the load goes: the address to connect to and the request line and Host header to send.

use http::{HeaderValue, Uri};

/// A plain-HTTP target, parsed once so that building a request copies nothing but handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to.
    pub connect: String,
    /// The Host header: the URL's authority unless overridden (a mesh proxy routes on it).
    pub host: HeaderValue,
    /// The origin-form request target, `/path?query`.
    pub path: Uri,
    /// The absolute form, `http://<host><path>`, for HTTP/2 (its `:authority` is the Host).
    pub absolute: Uri,
}

impl Target {
    /// Parses `http://HOST[:PORT][/PATH]`; `host` replaces the Host header the URL implies.
    pub fn parse(url: &str, host: Option<&str>) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url:?} must start with http:// (loadgen speaks plain HTTP)"));
        }
        let authority = uri.authority().ok_or_else(|| format!("--url {url:?} has no host"))?;
        let connect = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let host = host.unwrap_or(authority.as_str());
        let host = HeaderValue::from_str(host)
            .map_err(|_| format!("--host {host:?} is not a valid header value"))?;
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            Some(p) if p.starts_with('/') => p,
            _ => "/",
        };
        let absolute: Uri = format!("http://{}{path}", host.to_str().unwrap_or_default())
            .parse()
            .map_err(|e| format!("--host {host:?} with path {path:?}: {e}"))?;
        let path: Uri = path.parse().map_err(|e| format!("--url {url:?}: path {path:?}: {e}"))?;
        Ok(Self { connect, host, path, absolute })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_address_path_and_host() {
        let t = Target::parse("http://127.0.0.1:15001/api/v1?x=1", Some("upstream.bench:8080")).unwrap();
        assert_eq!(t.connect, "127.0.0.1:15001");
        assert_eq!(t.host, "upstream.bench:8080");
        assert_eq!(t.path, "/api/v1?x=1");
        assert_eq!(t.absolute, "http://upstream.bench:8080/api/v1?x=1");

        let t = Target::parse("http://localhost", None).unwrap();
        assert_eq!(t.connect, "localhost:80");
        assert_eq!(t.host, "localhost");
        assert_eq!(t.path, "/");
    }

    #[test]
    fn refuses_what_it_cannot_send() {
        for bad in ["https://127.0.0.1/", "127.0.0.1:80", "/path"] {
            assert!(Target::parse(bad, None).is_err(), "{bad}");
        }
        assert!(Target::parse("http://127.0.0.1/", Some("bad\nhost")).is_err());
    }
}
