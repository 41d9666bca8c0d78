//! `egpuctl`: see the library crate for the commands.

use std::process::ExitCode;

fn main() -> ExitCode {
    match egpuctl::run() {
        Ok(code) => code,
        Err(error) => egpuctl::client::report(&error),
    }
}
