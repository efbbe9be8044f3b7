//! The `roost` binary: parse the command line, set up logging, run the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = roost::cli::Cli::parse();
    roost::cli::init_tracing(cli.verbose, cli.command.is_server());
    match roost::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("roost: {}", chain.join(": "));
            std::process::ExitCode::from(1)
        }
    }
}
