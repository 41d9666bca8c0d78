//! Running a helper program with a time limit: `doctor`'s probes and `service`'s launchctl and
//! systemctl calls.
//!
//! Both pipes are drained on their own threads while the child runs, so a child that writes
//! more than a pipe buffer never blocks waiting for us (which would hold it until the time
//! limit); at the limit the child is killed and what it wrote so far is kept.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a child process did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// `None`: killed at the time limit, or ended by a signal.
    pub code: Option<i32>,
    pub success: bool,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with stdin closed for at most `limit`, reading its output as it comes.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> anyhow::Result<Finished> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    // std has no wait with a time limit: poll, sleeping briefly between looks.
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (Some(status), false);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Finished {
        code: status.and_then(|s| s.code()),
        success: status.is_some_and(|s| s.success()),
        timed_out,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_time_out_and_report() {
        let ran = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; sleep 5"]),
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(ran.timed_out && ran.code.is_none() && !ran.success);
        assert_eq!(
            (ran.stdout.as_str(), ran.stderr.as_str()),
            ("out\n", "err\n")
        );
        let ran = run_with_timeout(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            (ran.code, ran.timed_out, ran.success),
            (Some(3), false, false)
        );
        assert_eq!(ran.stderr, "oops\n");
        assert!(run_with_timeout(
            &mut Command::new("/nonexistent/python"),
            Duration::from_secs(1)
        )
        .is_err());
    }

    #[test]
    fn a_chatty_child_is_drained_while_it_runs() {
        // 2 MiB on each pipe: far more than a pipe buffer (64 KiB on Linux). A runner that
        // read only after the child exited would hold it until the time limit.
        let started = Instant::now();
        let ran = run_with_timeout(
            Command::new("sh").args([
                "-c",
                "head -c 2097152 /dev/zero | tr '\\0' a; head -c 2097152 /dev/zero | tr '\\0' b >&2",
            ]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(ran.success && !ran.timed_out, "{:?}", ran.code);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(ran.stdout.len(), 2 << 20);
        assert_eq!(ran.stderr.len(), 2 << 20);
        assert!(ran.stdout.bytes().all(|b| b == b'a'));
    }
}
