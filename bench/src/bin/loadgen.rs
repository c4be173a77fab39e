//! `loadgen`: open-loop fixed-rate HTTP/1.1 or HTTP/2 load, coordinated omission corrected (see
//! `skein_bench::schedule`). `bench/run.sh` runs it with `--json`.
#![forbid(unsafe_code)]

use skein_bench::loadgen::{self, Args};

fn main() -> anyhow::Result<()> {
    // Bad flags exit with 64 (EX_USAGE); --help and --version with 0.
    let args: Args = skein_api::process::parse_args();
    let target = args.validate().unwrap_or_else(|message| {
        eprintln!("loadgen: {message}");
        std::process::exit(64);
    });
    let summary = loadgen::run(&args, target)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(())
}
