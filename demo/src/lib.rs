//! The local mesh demo: Skein's file-backed control plane, the demo service in two versions,
//! a sidecar in front of every workload and a load-generating client, all on loopback addresses
//! with mTLS between the sidecars. `skein-demo` runs it with a live summary; the scenario tests
//! drive the same pieces.
#![forbid(unsafe_code)]

pub mod http;
pub mod load;
pub mod mesh;

pub use load::{LoadSpec, Tally};
pub use mesh::{Mesh, Options, Topology};

/// Errors that stop the demo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} not found in {dir} (build first: `make build`, or `cargo build --workspace --bins --examples`)")]
    MissingBinary { binary: String, dir: std::path::PathBuf },
    #[error("starting {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not happen within {secs} s{hint}")]
    Timeout { what: String, secs: u64, hint: String },
    #[error("{0} exited early; see its log in {1}")]
    Exited(String, std::path::PathBuf),
    #[error("{0}")]
    Http(String),
    #[error("{addr} is in use (another skein-demo? --ip-prefix picks other addresses): {source}")]
    AddressInUse {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
