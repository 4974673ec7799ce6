//! `cargo xtask`: the project's two commands.
//!
//! - `cargo xtask demo [--state-dir DIR]` brings up the two-site demo and runs until Ctrl-C.
//! - `cargo xtask test` installs what the tests need (as root on Debian) and runs every test.
//! - `cargo xtask image build|boot-test` builds the appliance image and boots it in qemu.

mod demo;
mod image;
mod system;
mod test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "QuteMail project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the two-site demo (simulated QKD link, a kmd per site) until interrupted.
    Demo {
        /// Directory for the demo's state: state.json, sockets, logs, configs. A temporary
        /// directory is used when omitted.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Build and run in release mode.
        #[arg(long)]
        release: bool,
        /// Exit as soon as the demo is ready (after writing state.json), stopping everything.
        #[arg(long)]
        check: bool,
    },
    /// Install the tests' system dependencies (as root on Debian) and run every test.
    Test {
        /// Do not install anything; fail if something is missing.
        #[arg(long)]
        no_install: bool,
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// The appliance's Debian 12 disk image: build it, or build and boot it in qemu (as root).
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { state_dir, release, check } => demo::run(state_dir, release, check),
        Command::Test { no_install, cargo_args } => test::run(no_install, &cargo_args),
        Command::Image { command } => image::run(command),
    }
}
