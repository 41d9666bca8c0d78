//! `egpuctl service install | uninstall | status | logs`: run egpud whenever the user is
//! logged in, and start it again when it dies.
//!
//! macOS: a launchd LaunchAgent (`~/Library/LaunchAgents/dev.egpu.egpud.plist`, loaded with
//! `launchctl bootstrap gui/<uid>`), logs in `~/Library/Logs/egpu/egpud.log`. Linux: a systemd
//! user unit (`~/.config/systemd/user/egpud.service`, `systemctl --user enable --now`), logs
//! in the journal. Both files are generated on every OS, so `--platform` with `--dry-run`
//! shows (and the tests check) either one anywhere.

pub mod launchd;
pub mod systemd;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context as _};
use egpu_proto::v1::StatusRequest;

use crate::client::{connect, request, EXIT_UNREACHABLE};
use crate::format::uptime;
use crate::subprocess::run_with_timeout;

/// How long a launchctl or systemctl call may take before egpuctl gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ServiceCommand {
    /// Run egpud at login and restart it when it crashes (a LaunchAgent on macOS, a systemd
    /// user unit on Linux). Running it again updates the file; it is idempotent.
    Install(InstallArgs),
    /// Stop the service and remove its file (and, on macOS, its log folder).
    Uninstall(Options),
    /// Whether the service is installed, loaded, and egpud answers on the socket
    /// (exit status 2 when it does not answer).
    Status(PlatformOption),
    /// Show egpud's log (macOS: ~/Library/Logs/egpu/egpud.log; Linux: the user journal).
    Logs(LogsArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    Macos,
    Linux,
}

impl Platform {
    pub fn host() -> Platform {
        if cfg!(target_os = "macos") {
            Platform::Macos
        } else {
            Platform::Linux
        }
    }
}

#[derive(Debug, clap::Args)]
struct PlatformOption {
    /// Which service manager [default: this machine's]; another one only with --dry-run.
    #[arg(long, value_enum)]
    platform: Option<Platform>,
}

#[derive(Debug, clap::Args)]
struct Options {
    /// Print the file and the commands instead of changing anything.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    platform: PlatformOption,
}

#[derive(Debug, clap::Args)]
struct InstallArgs {
    #[command(flatten)]
    options: Options,
    /// An environment variable for egpud, KEY=VALUE; repeat for more. It replaces the
    /// service's default of the same name (DEV=PCI+AMD, PATH, EGPU_LOG=info), e.g.
    /// `--env DEV=PCI+AMD:LLVM` or `--env DEV=AMD` on Linux.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_var)]
    env: Vec<(String, String)>,
    /// egpud's backend for models loaded without one (`cpu` or `tinygrad`); the same as
    /// `-- --backend NAME`. With `tinygrad`, EGPU_WORKER_PYTHON is set to the worker Python
    /// egpuctl finds (as egpud would; see `egpuctl doctor`) unless --env sets it.
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
    /// Flags for egpud, after `--` (e.g. `-- --memory-budget 8GiB --keep-alive 30m`).
    #[arg(last = true, value_name = "EGPUD_FLAGS")]
    egpud_args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    #[command(flatten)]
    options: Options,
    /// How many of the last lines to show.
    #[arg(short = 'n', long, default_value_t = 100)]
    lines: u32,
    /// Keep printing new lines as they are logged.
    #[arg(short, long)]
    follow: bool,
}

/// What the generated files say: which egpud, with which flags, for which user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Absolute path of the egpud binary.
    pub egpud: PathBuf,
    pub args: Vec<String>,
    /// PATH for egpud: finds the tinygrad worker's Python.
    pub path_env: String,
    pub home: PathBuf,
    /// `--env KEY=VALUE`: replace the defaults of the same name, the others come after them.
    pub env: EnvVars,
}

impl ServiceSpec {
    /// egpud's environment in the service file: DEV (tinygrad's device, the eGPU by default),
    /// PATH and EGPU_LOG, each replaced by an `--env` of the same name, then the other `--env`s
    /// in their order (a repeated name: the last one wins).
    pub fn environment(&self) -> EnvVars {
        let mut vars: EnvVars = vec![
            ("DEV".into(), launchd::TINYGRAD_DEV.into()),
            ("PATH".into(), self.path_env.clone()),
            ("EGPU_LOG".into(), "info".into()),
        ];
        for (key, value) in &self.env {
            match vars.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = value.clone(),
                None => vars.push((key.clone(), value.clone())),
            }
        }
        vars
    }
}

/// Environment variables, in order.
pub type EnvVars = Vec<(String, String)>;

/// `--env KEY=VALUE`: KEY is a shell-style variable name.
fn parse_env_var(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let mut chars = key.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{key:?} is not a variable name"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "the value of {key} holds a control character (a newline would add lines to the \
             service file)"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// egpud's flags and extra environment for `service install`: `--backend` goes first among
/// the flags; with the tinygrad backend, EGPU_WORKER_PYTHON is pinned to `worker_python`
/// (when it exists) unless `--env` sets it.
pub fn install_settings(
    backend: Option<&str>,
    egpud_args: &[String],
    env: &[(String, String)],
    worker_python: &egpu_proto::paths::WorkerPython,
) -> anyhow::Result<(Vec<String>, EnvVars)> {
    if let Some(arg) = egpud_args.iter().find(|a| a.chars().any(char::is_control)) {
        bail!("egpud flag {arg:?} holds a control character (a newline would add lines to the service file)");
    }
    let mut args = Vec::new();
    let mut env = env.to_vec();
    if let Some(backend) = backend {
        if egpud_args
            .iter()
            .any(|a| a == "--backend" || a.starts_with("--backend="))
        {
            bail!("--backend is given twice: as an egpuctl flag and after `--`");
        }
        args.extend(["--backend".to_owned(), backend.to_owned()]);
        let pinned = env
            .iter()
            .any(|(k, _)| k == egpu_proto::paths::WORKER_PYTHON_ENV);
        if backend == "tinygrad" && !pinned && worker_python.exists {
            env.push((
                egpu_proto::paths::WORKER_PYTHON_ENV.to_owned(),
                worker_python.path.display().to_string(),
            ));
        }
    }
    args.extend(egpud_args.iter().cloned());
    Ok((args, env))
}

/// The parts of the environment the service commands depend on.
#[derive(Debug, Clone)]
pub struct Env {
    pub home: PathBuf,
    pub config_home: PathBuf,
    pub uid: u32,
    /// The caller's PATH (to find egpud and python3).
    pub path: Option<OsString>,
    /// Whether a systemd user manager can be reached (a session bus).
    pub user_bus: bool,
}

impl Env {
    pub fn from_process() -> anyhow::Result<Env> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let home = var("HOME")
            .map(PathBuf::from)
            .context("HOME is not set: cannot tell where the service files go")?;
        let config_home = var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".config"));
        let runtime_bus =
            var("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).join("bus").exists());
        Ok(Env {
            home,
            config_home,
            uid: rustix::process::getuid().as_raw(),
            path: var("PATH"),
            user_bus: runtime_bus || var("DBUS_SESSION_BUS_ADDRESS").is_some(),
        })
    }

    fn unit_path(&self) -> PathBuf {
        systemd::unit_path(&self.config_home)
    }
}

pub async fn run(socket: &Path, args: &ServiceArgs) -> anyhow::Result<ExitCode> {
    let env = Env::from_process()?;
    let mut out = std::io::stdout().lock();
    let mut runner = SystemRunner;
    match &args.command {
        ServiceCommand::Install(a) => {
            let platform = platform(&a.options)?;
            let (args, extra_env) = install_settings(
                a.backend.as_deref(),
                &a.egpud_args,
                &a.env,
                &egpu_proto::paths::worker_python(None),
            )?;
            let spec = ServiceSpec {
                egpud: find_egpud(env.path.as_deref())?,
                args,
                path_env: service_path(platform, env.path.as_deref()),
                home: env.home.clone(),
                env: extra_env,
            };
            let mut ops = Ops::new(a.options.dry_run, &mut out, &mut runner);
            install(platform, &env, &spec, &mut ops)?;
        }
        ServiceCommand::Uninstall(o) => {
            let platform = platform(o)?;
            let mut ops = Ops::new(o.dry_run, &mut out, &mut runner);
            uninstall(platform, &env, &mut ops)?;
        }
        ServiceCommand::Status(p) => {
            let platform = platform(&Options {
                dry_run: true,
                platform: PlatformOption {
                    platform: p.platform,
                },
            })?;
            return status(platform, &env, socket, &mut out, &mut runner).await;
        }
        ServiceCommand::Logs(a) => {
            let platform = platform(&a.options)?;
            let argv = logs_command(platform, &env, a.lines, a.follow);
            if a.options.dry_run {
                writeln!(out, "{}", shell_words(&argv))?;
                return Ok(ExitCode::SUCCESS);
            }
            if platform == Platform::Macos && !launchd::log_file(&env.home).exists() {
                bail!(
                    "no log yet at {} (is the service installed? `egpuctl service install`)",
                    launchd::log_file(&env.home).display()
                );
            }
            drop(out);
            let status = Command::new(&argv[0])
                .args(&argv[1..])
                .status()
                .with_context(|| format!("running {}", argv[0]))?;
            return Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The platform asked for; another OS's service manager only for a dry run.
fn platform(options: &Options) -> anyhow::Result<Platform> {
    let host = Platform::host();
    let wanted = options.platform.platform.unwrap_or(host);
    if wanted != host && !options.dry_run {
        bail!(
            "--platform {} on this machine works only with --dry-run",
            format!("{wanted:?}").to_lowercase()
        );
    }
    Ok(wanted)
}

/// The installed egpud: the one next to this egpuctl, else the first on PATH.
pub fn find_egpud(path: Option<&std::ffi::OsStr>) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| std::fs::canonicalize(exe).ok())
        .and_then(|exe| exe.parent().map(|dir| dir.join("egpud")));
    if let Some(p) = beside.as_ref().filter(|p| is_executable(p)) {
        return std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()));
    }
    if let Some(p) = find_on_path(path, "egpud") {
        return std::fs::canonicalize(&p).with_context(|| format!("resolving {}", p.display()));
    }
    bail!(
        "cannot find egpud: it is neither next to egpuctl ({}) nor on PATH; install both \
         (`cargo install --path daemon --path cli`) and try again",
        beside
            .as_deref()
            .and_then(Path::parent)
            .map_or_else(|| "?".into(), |d| d.display().to_string())
    )
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(path: Option<&std::ffi::OsStr>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// PATH for the service: the folder of the `python3` the caller would run (the tinygrad
/// worker's interpreter, e.g. a virtualenv's), then the system's usual folders.
pub fn service_path(platform: Platform, caller_path: Option<&std::ffi::OsStr>) -> String {
    let mut dirs: Vec<String> = Vec::new();
    if let Some(dir) =
        find_on_path(caller_path, "python3").and_then(|p| p.parent().map(Path::to_owned))
    {
        dirs.push(dir.display().to_string());
    }
    let system: &[&str] = match platform {
        Platform::Macos => &[
            "/opt/homebrew/bin",
            "/usr/local/bin",
            "/usr/bin",
            "/bin",
            "/usr/sbin",
            "/sbin",
        ],
        Platform::Linux => &["/usr/local/bin", "/usr/bin", "/bin"],
    };
    for dir in system {
        if !dirs.iter().any(|d| d == dir) {
            dirs.push((*dir).to_owned());
        }
    }
    dirs.join(":")
}

/// The outcome of a command egpuctl ran.
#[derive(Debug, Clone, Default)]
pub struct CmdOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs launchctl / systemctl; the tests substitute a fake.
pub trait Runner {
    fn run(&mut self, argv: &[String]) -> anyhow::Result<CmdOutput>;
}

/// Runs real commands, each for at most [`COMMAND_TIMEOUT`].
#[derive(Debug)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&mut self, argv: &[String]) -> anyhow::Result<CmdOutput> {
        let ran = run_with_timeout(Command::new(&argv[0]).args(&argv[1..]), COMMAND_TIMEOUT)
            .with_context(|| format!("running {}", argv[0]))?;
        if ran.timed_out {
            bail!(
                "`{}` did not finish in {COMMAND_TIMEOUT:?}",
                shell_words(argv)
            );
        }
        Ok(CmdOutput {
            success: ran.success,
            stdout: ran.stdout,
            stderr: ran.stderr,
        })
    }
}

/// Changes to the system, or, in a dry run, their description on `out`.
pub struct Ops<'a> {
    dry_run: bool,
    out: &'a mut dyn Write,
    runner: &'a mut dyn Runner,
}

impl std::fmt::Debug for Ops<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("dry_run", &self.dry_run)
            .finish()
    }
}

impl<'a> Ops<'a> {
    pub fn new(dry_run: bool, out: &'a mut dyn Write, runner: &'a mut dyn Runner) -> Ops<'a> {
        Ops {
            dry_run,
            out,
            runner,
        }
    }

    fn say(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.out, "{line}")?;
        Ok(())
    }

    fn mkdir(&mut self, dir: &Path) -> anyhow::Result<()> {
        if self.dry_run {
            return self.say(&format!(
                "mkdir -p {}",
                shell_quote(&dir.display().to_string())
            ));
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
    }

    /// Writes a file unless it already holds `bytes`; whether it changed.
    fn write(&mut self, path: &Path, bytes: &[u8]) -> anyhow::Result<bool> {
        let changed = std::fs::read(path).ok().as_deref() != Some(bytes);
        if self.dry_run {
            self.say(&format!("# write {}:", path.display()))?;
            self.out.write_all(bytes)?;
            return self
                .say(&format!("# end of {}", path.display()))
                .map(|()| changed);
        }
        if !changed {
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
        self.say(&format!("wrote {}", path.display()))?;
        Ok(true)
    }

    fn remove(&mut self, path: &Path, what: &str) -> anyhow::Result<()> {
        if self.dry_run {
            return self.say(&format!(
                "rm -rf {}",
                shell_quote(&path.display().to_string())
            ));
        }
        let result = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        match result {
            Ok(()) => self.say(&format!("removed {what} {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    /// Runs a command that must succeed; `when` describes its condition in a dry run.
    fn run(&mut self, argv: &[String], when: Option<&str>) -> anyhow::Result<()> {
        if self.dry_run {
            let note = when.map_or_else(String::new, |w| format!("   # {w}"));
            return self.say(&format!("{}{note}", shell_words(argv)));
        }
        let output = self.runner.run(argv)?;
        if !output.success {
            bail!("`{}` failed: {}", shell_words(argv), first_line(&output));
        }
        self.say(&format!("ran {}", shell_words(argv)))
    }

    /// Runs a command whose failure is fine (nothing to stop, say); never in a dry run.
    fn try_run(&mut self, argv: &[String], when: &str) -> anyhow::Result<Option<CmdOutput>> {
        if self.dry_run {
            self.say(&format!("{}   # {when}", shell_words(argv)))?;
            return Ok(None);
        }
        Ok(Some(self.runner.run(argv)?))
    }

    /// Runs a read-only command, in a dry run too.
    fn query(&mut self, argv: &[String]) -> Option<CmdOutput> {
        self.runner.run(argv).ok()
    }
}

fn first_line(output: &CmdOutput) -> String {
    let text = if output.stderr.trim().is_empty() {
        &output.stdout
    } else {
        &output.stderr
    };
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
        .to_owned()
}

fn words(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn systemctl(args: &[&str]) -> Vec<String> {
    let mut argv = words(&["systemctl", "--user"]);
    argv.extend(words(args));
    argv
}

const NO_USER_BUS: &str = "no systemd user session to install into (no $XDG_RUNTIME_DIR/bus, no \
    DBUS_SESSION_BUS_ADDRESS: root in a container, or a login without systemd); nothing was \
    changed. `--dry-run` prints the unit, or run egpud directly";

/// Writes the service file and loads it. Idempotent: an unchanged file that is loaded
/// already is left alone; a changed one is reloaded.
pub fn install(
    platform: Platform,
    env: &Env,
    spec: &ServiceSpec,
    ops: &mut Ops<'_>,
) -> anyhow::Result<()> {
    if ops.dry_run {
        ops.say("# --dry-run: nothing is changed. `egpuctl service install` would:")?;
    }
    match platform {
        Platform::Macos => {
            let plist_path = launchd::plist_path(&env.home);
            let target = launchd::service_target(env.uid);
            ops.mkdir(&launchd::log_dir(&env.home))?;
            let changed = ops.write(&plist_path, &launchd::plist(spec))?;
            let print = words(&["launchctl", "print", &target]);
            let loaded = !ops.dry_run && ops.query(&print).is_some_and(|o| o.success);
            let bootout = words(&["launchctl", "bootout", &target]);
            let bootstrap = vec![
                "launchctl".into(),
                "bootstrap".into(),
                launchd::domain(env.uid),
                plist_path.display().to_string(),
            ];
            if ops.dry_run {
                ops.run(
                    &bootout,
                    Some("only if it is loaded already with another file"),
                )?;
                ops.run(
                    &bootstrap,
                    Some("unless it is loaded already with this file"),
                )?;
            } else if loaded && !changed {
                ops.say(&format!(
                    "{} is installed and loaded already",
                    launchd::LABEL
                ))?;
            } else {
                if loaded {
                    ops.run(&bootout, None)?;
                }
                ops.run(&bootstrap, None)?;
                ops.say(&format!(
                    "egpud runs at login now; logs: {}",
                    launchd::log_file(&env.home).display()
                ))?;
            }
        }
        Platform::Linux => {
            if !ops.dry_run && !env.user_bus {
                bail!("{NO_USER_BUS}");
            }
            let existed = env.unit_path().exists();
            let changed = ops.write(&env.unit_path(), systemd::unit(spec).as_bytes())?;
            ops.run(&systemctl(&["daemon-reload"]), None)?;
            ops.run(&systemctl(&["enable", "--now", systemd::UNIT]), None)?;
            if ops.dry_run {
                ops.run(
                    &systemctl(&["restart", systemd::UNIT]),
                    Some("only when an installed unit changed"),
                )?;
            } else if existed && changed {
                ops.run(&systemctl(&["restart", systemd::UNIT]), None)?;
            }
            if !ops.dry_run {
                ops.say("egpud runs at login now; logs: `egpuctl service logs`")?;
            }
        }
    }
    Ok(())
}

/// Stops the service and removes what `install` created.
pub fn uninstall(platform: Platform, env: &Env, ops: &mut Ops<'_>) -> anyhow::Result<()> {
    if ops.dry_run {
        ops.say("# --dry-run: nothing is changed. `egpuctl service uninstall` would:")?;
    }
    match platform {
        Platform::Macos => {
            let target = launchd::service_target(env.uid);
            let bootout = words(&["launchctl", "bootout", &target]);
            if let Some(out) = ops.try_run(&bootout, "if it is loaded")? {
                if out.success {
                    ops.say(&format!("stopped {}", launchd::LABEL))?;
                }
            }
            ops.remove(&launchd::plist_path(&env.home), "the LaunchAgent")?;
            ops.remove(&launchd::log_dir(&env.home), "the log folder")?;
        }
        Platform::Linux => {
            let unit = env.unit_path();
            if !ops.dry_run && !env.user_bus {
                // No user manager runs it, so there is nothing to stop: removing the file is all.
                ops.remove(&unit, "the unit")?;
                return ops.say("(no systemd user session: nothing to stop)");
            }
            if let Some(out) = ops.try_run(
                &systemctl(&["disable", "--now", systemd::UNIT]),
                "if it is installed",
            )? {
                if out.success {
                    ops.say(&format!("stopped and disabled {}", systemd::UNIT))?;
                }
            }
            ops.remove(&unit, "the unit")?;
            ops.run(&systemctl(&["daemon-reload"]), None)?;
            ops.try_run(
                &systemctl(&["reset-failed", systemd::UNIT]),
                "forget past failures",
            )?;
        }
    }
    Ok(())
}

/// The command that shows the log.
pub fn logs_command(platform: Platform, env: &Env, lines: u32, follow: bool) -> Vec<String> {
    let mut argv = match platform {
        Platform::Macos => vec!["tail".into(), "-n".into(), lines.to_string()],
        Platform::Linux => {
            let mut argv = words(&[
                "journalctl",
                "--user",
                "-u",
                systemd::UNIT,
                "--no-pager",
                "-n",
            ]);
            argv.push(lines.to_string());
            argv
        }
    };
    if follow {
        argv.push(match platform {
            Platform::Macos => "-F".into(),
            Platform::Linux => "-f".into(),
        });
    }
    if platform == Platform::Macos {
        argv.push(launchd::log_file(&env.home).display().to_string());
    }
    argv
}

/// Installed? Loaded? Answering? Exit status 0 only when egpud answers on the socket.
async fn status(
    platform: Platform,
    env: &Env,
    socket: &Path,
    out: &mut dyn Write,
    runner: &mut dyn Runner,
) -> anyhow::Result<ExitCode> {
    let file = match platform {
        Platform::Macos => launchd::plist_path(&env.home),
        Platform::Linux => env.unit_path(),
    };
    let installed = if file.exists() {
        format!("yes, {}", file.display())
    } else {
        format!("no (no {})", file.display())
    };
    let loaded = match platform {
        Platform::Macos => match runner.run(&words(&[
            "launchctl",
            "print",
            &launchd::service_target(env.uid),
        ])) {
            Ok(o) if o.success => {
                let field = |name: &str| {
                    o.stdout.lines().map(str::trim).find_map(|l| {
                        l.strip_prefix(name)
                            .map(|v| v.trim_start_matches([' ', '=']).trim().to_owned())
                    })
                };
                match (field("state"), field("pid")) {
                    (Some(state), Some(pid)) => format!("yes, {state} (pid {pid})"),
                    (Some(state), None) => format!("yes, {state}"),
                    _ => "yes".into(),
                }
            }
            Ok(_) => "no".into(),
            Err(e) => format!("unknown ({e:#})"),
        },
        Platform::Linux if !env.user_bus => "unknown (no systemd user session)".into(),
        Platform::Linux => {
            let query = |runner: &mut dyn Runner, what: &str| {
                runner
                    .run(&systemctl(&[what, systemd::UNIT]))
                    .map(|o| o.stdout.trim().to_owned())
                    .unwrap_or_else(|e| format!("unknown ({e:#})"))
            };
            let active = query(runner, "is-active");
            let enabled = query(runner, "is-enabled");
            format!("{active} ({enabled})")
        }
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let mut client = connect(socket).await?;
        let status = client.status(request(StatusRequest {})).await?.into_inner();
        anyhow::Ok(status)
    })
    .await;
    let (answering, code) = match answer {
        Ok(Ok(s)) => {
            let loading = s
                .models
                .iter()
                .filter(|m| m.state == egpu_proto::v1::ModelState::Loading as i32)
                .count();
            (
                format!(
                    "yes, egpud {} up {} with {} model(s){} on {}",
                    s.version,
                    uptime(s.uptime_seconds),
                    s.models.len(),
                    if loading > 0 {
                        format!(", {loading} loading")
                    } else {
                        String::new()
                    },
                    socket.display()
                ),
                ExitCode::SUCCESS,
            )
        }
        Ok(Err(e)) => (
            format!(
                "no ({})",
                crate::client::describe(&e)
                    .0
                    .trim_start_matches("egpuctl: ")
            ),
            ExitCode::from(EXIT_UNREACHABLE),
        ),
        Err(_) => (
            format!("no (no answer on {} within 5 s)", socket.display()),
            ExitCode::from(EXIT_UNREACHABLE),
        ),
    };
    writeln!(out, "installed: {installed}")?;
    writeln!(out, "loaded:    {loaded}")?;
    writeln!(out, "answering: {answering}")?;
    Ok(code)
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@%,".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records commands; `loaded` answers `launchctl print`.
    #[derive(Debug, Default)]
    struct Fake {
        ran: Vec<String>,
        loaded: bool,
    }

    impl Runner for Fake {
        fn run(&mut self, argv: &[String]) -> anyhow::Result<CmdOutput> {
            let line = shell_words(argv);
            let success = !line.starts_with("launchctl print") || self.loaded;
            if line.starts_with("launchctl bootstrap") {
                self.loaded = true;
            }
            self.ran.push(line);
            Ok(CmdOutput {
                success,
                ..Default::default()
            })
        }
    }

    fn env(home: &Path) -> Env {
        Env {
            home: home.to_owned(),
            config_home: home.join(".config"),
            uid: 501,
            path: None,
            user_bus: true,
        }
    }

    fn spec(home: &Path) -> ServiceSpec {
        ServiceSpec {
            egpud: "/usr/local/bin/egpud".into(),
            args: Vec::new(),
            path_env: "/usr/bin:/bin".into(),
            home: home.to_owned(),
            env: Vec::new(),
        }
    }

    /// Every file (not folder) under `dir`.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(files(&path));
            } else {
                found.push(path);
            }
        }
        found
    }

    fn step(
        dry_run: bool,
        fake: &mut Fake,
        f: impl FnOnce(&mut Ops<'_>) -> anyhow::Result<()>,
    ) -> String {
        let mut out = Vec::new();
        let mut ops = Ops::new(dry_run, &mut out, fake);
        f(&mut ops).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn launchd_install_is_idempotent_and_uninstall_leaves_no_file() {
        let home = tempfile::tempdir().unwrap();
        let (env, spec) = (env(home.path()), spec(home.path()));
        let mut fake = Fake::default();
        step(false, &mut fake, |ops| {
            install(Platform::Macos, &env, &spec, ops)
        });
        let plist = launchd::plist_path(home.path());
        assert_eq!(std::fs::read(&plist).unwrap(), launchd::plist(&spec));
        assert!(launchd::log_dir(home.path()).is_dir());
        let bootstrap = format!("launchctl bootstrap gui/501 {}", plist.display());
        assert_eq!(
            fake.ran,
            ["launchctl print gui/501/dev.egpu.egpud", bootstrap.as_str()]
        );

        // Again, unchanged and loaded: nothing to do.
        fake.ran.clear();
        let said = step(false, &mut fake, |ops| {
            install(Platform::Macos, &env, &spec, ops)
        });
        assert!(said.contains("loaded already"), "{said}");
        assert_eq!(fake.ran, ["launchctl print gui/501/dev.egpu.egpud"]);

        // A changed file is reloaded.
        fake.ran.clear();
        let mut other = spec.clone();
        other.args = vec!["--keep-alive".into(), "30m".into()];
        step(false, &mut fake, |ops| {
            install(Platform::Macos, &env, &other, ops)
        });
        assert_eq!(
            fake.ran[1..],
            [
                "launchctl bootout gui/501/dev.egpu.egpud",
                bootstrap.as_str()
            ]
        );

        fake.ran.clear();
        step(false, &mut fake, |ops| {
            uninstall(Platform::Macos, &env, ops)
        });
        assert_eq!(fake.ran, ["launchctl bootout gui/501/dev.egpu.egpud"]);
        assert_eq!(files(home.path()), Vec::<PathBuf>::new());
        assert!(!launchd::log_dir(home.path()).exists());
    }

    #[test]
    fn systemd_install_is_idempotent_and_uninstall_leaves_no_file() {
        let home = tempfile::tempdir().unwrap();
        let (env, spec) = (env(home.path()), spec(home.path()));
        let mut fake = Fake::default();
        step(false, &mut fake, |ops| {
            install(Platform::Linux, &env, &spec, ops)
        });
        let unit = home.path().join(".config/systemd/user/egpud.service");
        assert_eq!(
            std::fs::read_to_string(&unit).unwrap(),
            systemd::unit(&spec)
        );
        let expected = [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now egpud.service",
        ];
        assert_eq!(fake.ran, expected);
        fake.ran.clear();
        step(false, &mut fake, |ops| {
            install(Platform::Linux, &env, &spec, ops)
        });
        assert_eq!(fake.ran, expected, "a second install changes nothing");
        assert_eq!(files(home.path()), std::slice::from_ref(&unit));

        fake.ran.clear();
        step(false, &mut fake, |ops| {
            uninstall(Platform::Linux, &env, ops)
        });
        assert_eq!(
            fake.ran,
            [
                "systemctl --user disable --now egpud.service",
                "systemctl --user daemon-reload",
                "systemctl --user reset-failed egpud.service",
            ]
        );
        assert_eq!(files(home.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn without_a_user_bus_install_fails_and_writes_nothing() {
        let home = tempfile::tempdir().unwrap();
        let mut env = env(home.path());
        env.user_bus = false;
        let mut fake = Fake::default();
        let mut out = Vec::new();
        let mut ops = Ops::new(false, &mut out, &mut fake);
        let err = install(Platform::Linux, &env, &spec(home.path()), &mut ops).unwrap_err();
        assert!(err.to_string().contains("no systemd user session"), "{err}");
        assert!(fake.ran.is_empty());
        assert_eq!(files(home.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn dry_runs_print_and_change_nothing() {
        let home = tempfile::tempdir().unwrap();
        let (env, spec) = (env(home.path()), spec(home.path()));
        for platform in [Platform::Macos, Platform::Linux] {
            let mut fake = Fake::default();
            let said = step(true, &mut fake, |ops| install(platform, &env, &spec, ops));
            assert!(said.contains("# write "), "{said}");
            let said = step(true, &mut fake, |ops| uninstall(platform, &env, ops));
            assert!(said.contains("rm -rf "), "{said}");
            assert!(fake.ran.is_empty(), "{:?}", fake.ran);
        }
        assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);
    }

    #[test]
    fn templates_in_the_repository_match_the_generator() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let plist_spec = ServiceSpec {
            egpud: "/usr/local/bin/egpud".into(),
            args: Vec::new(),
            path_env: service_path(Platform::Macos, None),
            home: "/Users/YOU".into(),
            env: Vec::new(),
        };
        let unit_spec = ServiceSpec {
            path_env: service_path(Platform::Linux, None),
            home: "/home/YOU".into(),
            ..plist_spec.clone()
        };
        let expected = [
            (
                repo.join("launchd/dev.egpu.egpud.plist"),
                launchd::plist(&plist_spec),
            ),
            (
                repo.join("systemd/egpud.service"),
                systemd::unit(&unit_spec).into_bytes(),
            ),
        ];
        for (path, bytes) in expected {
            if std::env::var_os("EGPU_BLESS").is_some() {
                std::fs::write(&path, &bytes).unwrap();
            }
            let actual = std::fs::read(&path).unwrap_or_default();
            assert!(
                actual == bytes,
                "{} differs from the generator; rerun with EGPU_BLESS=1 to rewrite it:\n{}",
                path.display(),
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn env_overrides_replace_defaults_in_place_and_extras_follow() {
        let mut spec = spec(Path::new("/home/ada"));
        spec.env = vec![
            (
                "EGPU_WORKER_PYTHON".into(),
                "/src/egpu/worker/.venv/bin/python".into(),
            ),
            ("DEV".into(), "PCI+AMD:LLVM".into()),
            ("EGPU_WORKER_PYTHON".into(), "/other/python".into()),
        ];
        let vars = spec.environment();
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("DEV", "PCI+AMD:LLVM"),
                ("PATH", "/usr/bin:/bin"),
                ("EGPU_LOG", "info"),
                ("EGPU_WORKER_PYTHON", "/other/python"),
            ]
        );
        assert_eq!(
            parse_env_var("DEV=PCI+AMD=x"),
            Ok(("DEV".into(), "PCI+AMD=x".into()))
        );
        assert_eq!(parse_env_var("A_1="), Ok(("A_1".into(), String::new())));
        assert!(parse_env_var("DEV").is_err());
        // A newline would start a new line of the unit: `[Service]`, `ExecStartPre=…`.
        for injected in ["X=a\nExecStartPre=/bin/evil", "X=a\rb", "X=\u{1b}[31m"] {
            let err = parse_env_var(injected).unwrap_err();
            assert!(err.contains("control character"), "{err}");
        }
        assert!(parse_env_var("1A=b").is_err());
        assert!(parse_env_var("=b").is_err());
    }

    #[test]
    fn backend_flag_goes_first_and_pins_the_worker_python() {
        use egpu_proto::paths::{PythonRule, WorkerPython};
        let python = |exists| WorkerPython {
            path: "/src/egpu/worker/.venv/bin/python".into(),
            rule: PythonRule::Checkout,
            exists,
            checkout: Some("/src/egpu".into()),
        };
        let rest = vec!["--keep-alive".to_owned(), "30m".to_owned()];
        let (args, env) = install_settings(Some("tinygrad"), &rest, &[], &python(true)).unwrap();
        assert_eq!(args, ["--backend", "tinygrad", "--keep-alive", "30m"]);
        assert_eq!(
            env,
            [(
                "EGPU_WORKER_PYTHON".to_owned(),
                "/src/egpu/worker/.venv/bin/python".to_owned()
            )]
        );
        // Not when it is missing, not over an explicit --env, not for the cpu backend.
        let (_, env) = install_settings(Some("tinygrad"), &[], &[], &python(false)).unwrap();
        assert!(env.is_empty());
        let given = [("EGPU_WORKER_PYTHON".to_owned(), "/mine".to_owned())];
        let (_, env) = install_settings(Some("tinygrad"), &[], &given, &python(true)).unwrap();
        assert_eq!(env, given);
        let (args, env) = install_settings(Some("cpu"), &[], &[], &python(true)).unwrap();
        assert_eq!((args.len(), env.len()), (2, 0));
        // Without --backend, the flags after `--` are passed as they are.
        let (args, _) = install_settings(None, &rest, &[], &python(true)).unwrap();
        assert_eq!(args, rest);
        let twice = vec!["--backend=cpu".to_owned()];
        assert!(install_settings(Some("tinygrad"), &twice, &[], &python(true)).is_err());
    }

    #[test]
    fn logs_commands_and_quoting() {
        let env = env(Path::new("/Users/a b"));
        assert_eq!(
            shell_words(&logs_command(Platform::Macos, &env, 50, true)),
            "tail -n 50 -F '/Users/a b/Library/Logs/egpu/egpud.log'"
        );
        assert_eq!(
            shell_words(&logs_command(Platform::Linux, &env, 100, false)),
            "journalctl --user -u egpud.service --no-pager -n 100"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
