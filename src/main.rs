use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = detectd::cli::Cli::parse();
    match detectd::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("detectd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
