//! `crdgen`: prints the CRDs as one YAML stream, or with `--out DIR` writes one file per kind.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

/// Generate Skein's CustomResourceDefinitions from the Rust types.
#[derive(Parser)]
struct Args {
    /// Write one file per CRD into this directory instead of printing them.
    #[arg(long, env = "CRDGEN_OUT")]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for (file, crd) in skein_operator::crdgen::crds() {
        let text = skein_operator::crdgen::render(&crd);
        match &args.out {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                std::fs::write(dir.join(file), text)?;
            }
            None => print!("---\n{text}"),
        }
    }
    Ok(())
}
