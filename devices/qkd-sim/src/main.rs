//! The `qkd-sim` command: parses arguments and wires the library's parts together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use qkd_sim::control::{self, ControlRequest, EndSelector};
use qkd_sim::{SimConfig, Simulator};
use qutemail_service_notify::{Notifier, watchdog_interval};

#[derive(Parser)]
#[command(
    name = "qkd-sim",
    version,
    about = "Simulated QKD device pair speaking the QuteMail serial protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a simulated device pair: one pseudo-terminal per end, telemetry on stdout.
    Run(RunArgs),
    /// Send a command to a running simulator (fault injection, status).
    Ctl(CtlArgs),
    /// Print the physics model's figures (optimal mu, gain, QBER, key rate) at a distance.
    Model(ModelArgs),
    /// Play the host side against a device and print the blocks and telemetry it delivers.
    Host(HostArgs),
    /// Test a device against the serial protocol specification and report PASS/FAIL per check
    /// (exit status 0 all passed, 1 a check failed, 2 the device could not be tested).
    Conformance(ConformanceArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration file (every key documented in docs/qkd-sim.md); defaults apply without it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Fibre length in km (overrides [physics] distance_km).
    #[arg(long)]
    distance_km: Option<f64>,
    /// Laser pulse rate in Hz (overrides [physics] pulse_rate_hz).
    #[arg(long)]
    pulse_rate_hz: Option<f64>,
    /// Simulated seconds per wall-clock second (overrides time_scale).
    #[arg(long)]
    time_scale: Option<f64>,
    /// Serial line speed the devices pace their output to (overrides [serial] baud_rate).
    #[arg(long)]
    baud_rate: Option<u32>,
    /// Unix socket for `qkd-sim ctl` (overrides control_socket).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Write a JSON file with the pty paths, control socket and link ID once both ends are up.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Seconds between telemetry lines on stdout (0 turns them off).
    #[arg(long, default_value_t = 1.0)]
    print_every: f64,
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The simulator's control socket.
    #[arg(long, short)]
    socket: PathBuf,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand)]
enum CtlAction {
    /// Print the link's and both devices' status as JSON.
    Status,
    /// Cut the fibre (`on`) or mend it (`off`).
    FibreCut {
        /// on or off.
        state: OnOff,
    },
    /// Put an intercept-resend eavesdropper on a fraction of the pulses (0 removes her).
    Eavesdrop {
        /// Fraction of pulses intercepted, 0 to 1.
        fraction: f64,
    },
    /// Flip and drop bytes on a serial line.
    Noise {
        /// alice, bob or both.
        end: EndSelector,
        /// Probability a byte has a bit flipped.
        #[arg(long, default_value_t = 0.0)]
        flip_rate: f64,
        /// Probability a byte is lost.
        #[arg(long, default_value_t = 0.0)]
        drop_rate: f64,
    },
    /// Power-cycle a device.
    Reboot {
        /// alice, bob or both.
        end: EndSelector,
    },
    /// Change the fibre length.
    Distance {
        /// Kilometres.
        km: f64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Fibre length in km.
    #[arg(long, allow_negative_numbers = true, required_unless_present_any = ["max_distance", "table"])]
    distance_km: Option<f64>,
    /// Print the distance at which the secret key rate reaches zero.
    #[arg(long)]
    max_distance: bool,
    /// Print a table of the model against distance.
    #[arg(long)]
    table: bool,
    /// Physics parameters from a simulator config file ([physics] table).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Laser pulse rate in Hz (default: the GYS experiment's).
    #[arg(long)]
    pulse_rate_hz: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct HostArgs {
    /// The device's serial path (a UART or a qkd-sim pseudo-terminal).
    #[arg(long, short)]
    device: PathBuf,
    /// Line speed in baud.
    #[arg(long, default_value_t = 115_200)]
    baud_rate: u32,
    /// Key blocks to request; the command exits after receiving them (0 = keep requesting).
    #[arg(long, default_value_t = 0)]
    blocks: u32,
    /// Print one JSON object per event instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ConformanceArgs {
    /// The device's serial port (a UART such as /dev/ttyUSB0, or a pseudo-terminal).
    #[arg(long, short)]
    device: PathBuf,
    /// Line speed in baud (8N1, no flow control); every wait is lengthened for slow lines.
    #[arg(long, default_value_t = 115_200)]
    baud_rate: u32,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Milliseconds the device may take to answer a frame (HELLO, PING, a bad frame).
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Milliseconds the device must send no KEY_BLOCK without credit, and none beyond it.
    #[arg(long, default_value_t = 2000)]
    quiet_ms: u64,
    /// Milliseconds the device may take to deliver credited key blocks (it may distil them first).
    #[arg(long, default_value_t = 30_000)]
    block_wait_ms: u64,
    /// Milliseconds the device may take to resend an unacknowledged frame.
    #[arg(long, default_value_t = 10_000)]
    retransmit_wait_ms: u64,
    /// Milliseconds after the handshake within which the first TELEMETRY must arrive.
    #[arg(long, default_value_t = 5000)]
    telemetry_wait_ms: u64,
}

fn main() -> anyhow::Result<()> {
    // Behave like other command-line tools when stdout is a closed pipe (`| head`): exit quietly.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    let _ = unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.command {
        Command::Run(args) => rt.block_on(run(args)),
        Command::Ctl(args) => rt.block_on(ctl(args)),
        Command::Model(args) => model(args),
        Command::Host(args) => {
            rt.block_on(qkd_sim::host::run(args.device, args.baud_rate, args.blocks, args.json))?;
            Ok(())
        }
        Command::Conformance(args) => {
            let opts = qkd_sim::conformance::ConformanceOptions {
                baud_rate: args.baud_rate,
                timeout: Duration::from_millis(args.timeout_ms),
                quiet_period: Duration::from_millis(args.quiet_ms),
                block_wait: Duration::from_millis(args.block_wait_ms),
                retransmit_wait: Duration::from_millis(args.retransmit_wait_ms),
                telemetry_wait: Duration::from_millis(args.telemetry_wait_ms),
                ..qkd_sim::conformance::ConformanceOptions::new(args.device)
            };
            // Exit status: 0 every check passed, 1 a check failed, 2 the device could not be tested.
            match rt.block_on(qkd_sim::conformance::cli(opts, args.json)) {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2)
                }
            }
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => SimConfig::load(path)?,
        None => SimConfig::default(),
    };
    if let Some(v) = args.distance_km {
        config.physics.distance_km = v;
    }
    if let Some(v) = args.pulse_rate_hz {
        config.physics.pulse_rate_hz = v;
    }
    if let Some(v) = args.time_scale {
        config.time_scale = v;
    }
    if let Some(v) = args.baud_rate {
        config.serial.baud_rate = v;
    }
    if let Some(v) = args.control_socket {
        config.control_socket = Some(v);
    }
    if let Err(e) = config.validate() {
        bail!("invalid settings: {e}");
    }
    let control_socket = config.control_socket.clone();
    let link_id = config.link_id.clone();
    // KME mode: the link's blocks feed two ETSI GS QKD 014 KMEs instead of the serial ends.
    let (sim, kme) = match config.kme.clone() {
        Some(kme_config) => {
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            let kme = qkd_sim::kme::KmePair::start(kme_config, rx).await?;
            (Simulator::start(config, Some(tx))?, Some(kme))
        }
        None => (Simulator::start(config, None)?, None),
    };
    let sim = Arc::new(sim);
    let status = sim.status();
    let kme_addrs = kme.as_ref().map(|k| k.addrs());
    match kme_addrs {
        Some((a, b)) => {
            println!("KME A: https://{a}/api/v1/keys/");
            println!("KME B: https://{b}/api/v1/keys/");
        }
        None => {
            println!("alice: {} ({})", status.alice.pty, status.alice.device_id);
            println!("bob:   {} ({})", status.bob.pty, status.bob.device_id);
        }
    }
    if let Some(path) = &control_socket {
        let sim = sim.clone();
        let socket = path.clone();
        tokio::spawn(async move {
            if let Err(e) = control::serve(&socket, sim).await {
                tracing::error!(socket = %socket.display(), error = %e, "control socket failed");
            }
        });
        println!("control socket: {}", path.display());
    }
    if let Some(path) = &args.state_file {
        let state = serde_json::json!({
            "link_id": link_id,
            "pid": std::process::id(),
            "control_socket": control_socket,
            "alice": { "pty": status.alice.pty, "device_id": status.alice.device_id },
            "bob": { "pty": status.bob.pty, "device_id": status.bob.device_id },
            "kme": kme_addrs.map(|(a, b)| serde_json::json!({
                "a": format!("https://{a}"),
                "b": format!("https://{b}"),
            })),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    let printer = async {
        if args.print_every <= 0.0 {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(args.print_every));
        loop {
            tick.tick().await;
            print_status_line(&sim.status());
        }
    };
    // Under systemd (qkd-sim.service, Type=notify): ready once both ends are up, watchdog
    // pets from the runtime that drives the simulation.
    let notifier = Notifier::from_env();
    notifier.ready(&format!("simulating link {}", sim.status().link.link_id));
    let watchdog = async {
        let Some(every) = watchdog_interval() else { return std::future::pending().await };
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notifier.watchdog();
        }
    };
    tokio::select! {
        () = printer => {}
        () = watchdog => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    notifier.stopping("stopping");
    if let Some(path) = &control_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn print_status_line(s: &qkd_sim::SimStatus) {
    let l = &s.link;
    println!(
        "[{:>8.1}s] link {} {:<14} QBER {:>5.2}%  secret {:>10.1} bit/s  blocks {:>6} (aborted {})  {:>8} key bytes  A: {} buffered{}  B: {} buffered{}",
        l.simulated_s,
        l.link_id,
        l.state.as_str(),
        l.qber * 100.0,
        l.secret_rate_bps,
        l.blocks_distilled,
        l.blocks_aborted,
        l.key_bytes,
        s.alice.buffered_blocks,
        if s.alice.in_session { ", host connected" } else { "" },
        s.bob.buffered_blocks,
        if s.bob.in_session { ", host connected" } else { "" },
    );
}

async fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let request = match args.action {
        CtlAction::Status => ControlRequest::Status,
        CtlAction::FibreCut { state } => ControlRequest::FibreCut { cut: matches!(state, OnOff::On) },
        CtlAction::Eavesdrop { fraction } => ControlRequest::Eavesdrop { fraction },
        CtlAction::Noise { end, flip_rate, drop_rate } => ControlRequest::Noise { end, flip_rate, drop_rate },
        CtlAction::Reboot { end } => ControlRequest::Reboot { end },
        CtlAction::Distance { km } => ControlRequest::Distance { km },
    };
    let answer = control::request(&args.socket, &request)
        .await
        .with_context(|| format!("cannot reach the simulator at {}", args.socket.display()))?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if answer.get("ok").and_then(|v| v.as_bool()) != Some(true) {
        bail!("the simulator refused the request");
    }
    Ok(())
}

fn model(args: ModelArgs) -> anyhow::Result<()> {
    let mut physics = match &args.config {
        Some(path) => SimConfig::load(path)?.physics,
        None => qkd_physics::LinkParameters::default(),
    };
    if let Some(v) = args.pulse_rate_hz {
        physics.pulse_rate_hz = v;
    }
    if args.max_distance {
        let km = qkd_physics::max_distance_km(&physics);
        if args.json {
            println!("{}", serde_json::json!({ "max_distance_km": km }));
        } else {
            println!("secret key rate reaches zero at {km:.2} km");
        }
        return Ok(());
    }
    let distances: Vec<f64> = match args.distance_km {
        Some(d) if !args.table => vec![d],
        _ => vec![0.0, 10.0, 25.0, 50.0, 75.0, 100.0, 125.0, 140.0],
    };
    for &d in &distances {
        physics.distance_km = d;
        physics.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let points = qkd_physics::rate_table(&physics, &distances);
    if args.json {
        let v =
            if points.len() == 1 { serde_json::to_value(points[0])? } else { serde_json::to_value(&points)? };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:>8} {:>7} {:>12} {:>9} {:>14} {:>14} {:>14}",
        "km", "mu", "gain Q_mu", "QBER %", "R bit/pulse", "secret bit/s", "sifted bit/s"
    );
    for p in points {
        println!(
            "{:>8.1} {:>7.3} {:>12.4e} {:>9.3} {:>14.4e} {:>14.4e} {:>14.4e}",
            p.distance_km,
            p.mu,
            p.gain_signal,
            p.qber_signal * 100.0,
            p.secret_rate_per_pulse,
            p.secret_rate_bps,
            p.sifted_rate_bps
        );
    }
    Ok(())
}
