//! Starting, watching and stopping the cluster's processes.
//!
//! Each component runs detached in its own session (`setsid`, or at least its own
//! process group), with stdout and stderr in its log file, so it outlives
//! `cargo xtask` and a terminal's Ctrl-C. It is recorded by PID *and* the start time
//! the kernel gives that PID (`/proc/PID/stat`), so `down` signals exactly the
//! processes `up` started, never a stranger that reused a PID after a crash or reboot.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process `up` started, as recorded in the state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recorded {
    pub name: String,
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot when it started.
    pub start_time: u64,
}

/// One component to start.
#[derive(Debug)]
pub struct Component {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
}

/// A component started by this `up`, still our child.
#[derive(Debug)]
pub struct Running {
    pub child: Child,
    pub recorded: Recorded,
    pub log: PathBuf,
}

/// Starts `component` detached, with its output in its log file.
pub fn spawn(component: &Component) -> Result<Running> {
    let log = File::create(&component.log)
        .with_context(|| format!("failed to create {}", component.log.display()))?;
    let err_log = log
        .try_clone()
        .with_context(|| format!("failed to open {}", component.log.display()))?;
    // `setsid PROGRAM` execs PROGRAM in place (same PID) when the caller is not a
    // process group leader, which a freshly forked child never is.
    let mut command = match which("setsid") {
        Some(setsid) => {
            let mut command = Command::new(setsid);
            command.arg(&component.program);
            command
        }
        None => {
            use std::os::unix::process::CommandExt;
            let mut command = Command::new(&component.program);
            command.process_group(0);
            command
        }
    };
    command
        .args(&component.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log);
    let child = command
        .spawn()
        .with_context(|| format!("failed to start {}", component.program.display()))?;
    let pid = child.id();
    let start_time = proc_stat(pid)
        .map(|stat| stat.start_time)
        .with_context(|| format!("{} (pid {pid}) vanished at once", component.name))?;
    Ok(Running {
        child,
        recorded: Recorded {
            name: component.name.to_owned(),
            pid,
            start_time,
        },
        log: component.log.clone(),
    })
}

/// Polls `ready` until it says yes, failing early, with the log's tail, when the
/// process exits, and after `timeout`.
pub fn wait_ready(
    running: &mut Running,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let name = running.recorded.name.clone();
    let start = Instant::now();
    loop {
        if let Some(status) = running
            .child
            .try_wait()
            .with_context(|| format!("failed to check on {name}"))?
        {
            bail!("{}", exited(&name, status, &running.log));
        }
        if ready() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "{name} did not become ready within {}s; last lines of {}:\n{}",
                timeout.as_secs(),
                running.log.display(),
                tail(&running.log, 25)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn exited(name: &str, status: ExitStatus, log: &Path) -> String {
    format!(
        "{name} exited ({status}) before it was ready; last lines of {}:\n{}",
        log.display(),
        tail(log, 25)
    )
}

/// The last `lines` lines of a log file, or why there are none.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            let shown = all[from..].join("\n");
            if shown.trim().is_empty() {
                "(the log is empty)".to_owned()
            } else {
                shown
            }
        }
        Err(error) => format!("(cannot read the log: {error})"),
    }
}

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub state: char,
    pub start_time: u64,
}

/// Reads `/proc/PID/stat`; `None` when there is no such process.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); start time is field 22.
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// Whether the recorded process still runs (same PID, same start, not a zombie).
pub fn alive(recorded: &Recorded) -> bool {
    proc_stat(recorded.pid).is_some_and(|stat| {
        stat.start_time == recorded.start_time && !matches!(stat.state, 'Z' | 'X' | 'x')
    })
}

/// Stops a recorded process and its process group: SIGTERM, then SIGKILL after a
/// grace period. A process that is already gone (or whose PID now belongs to
/// someone else) is left alone.
pub fn stop(recorded: &Recorded) -> Result<()> {
    if !alive(recorded) {
        return Ok(());
    }
    let group = Pid::from_raw(
        i32::try_from(recorded.pid)
            .with_context(|| format!("pid {} out of range", recorded.pid))?,
    );
    for (signal, grace) in [
        (Signal::SIGTERM, Duration::from_secs(15)),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ] {
        match killpg(group, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "failed to send {signal} to {} (process group {})",
                        recorded.name, recorded.pid
                    )
                });
            }
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if !alive(recorded) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    bail!(
        "{} (pid {}) is still running after SIGKILL",
        recorded.name,
        recorded.pid
    )
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("failed to find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Whether a component can listen on 127.0.0.1:`port`.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A plain-HTTP GET on 127.0.0.1 (etcd's client port speaks HTTP without TLS here):
/// the status code and body, or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// The first `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_under_its_own_start_time_only() {
        let pid = std::process::id();
        let stat = proc_stat(pid).expect("own /proc entry");
        let me = Recorded {
            name: "xtask".into(),
            pid,
            start_time: stat.start_time,
        };
        assert!(alive(&me));
        let impostor = Recorded {
            start_time: stat.start_time + 1,
            ..me
        };
        assert!(!alive(&impostor));
    }

    #[test]
    fn a_detached_process_is_stopped_by_its_recorded_pid() {
        let dir = std::env::temp_dir().join(format!("xtask-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let component = Component {
            name: "sleeper",
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), "echo started; exec sleep 600".into()],
            log: dir.join("sleeper.log"),
        };
        let mut running = spawn(&component).expect("spawns");
        wait_ready(&mut running, Duration::from_secs(10), || {
            tail(&component.log, 1) == "started"
        })
        .expect("writes its log");
        assert!(alive(&running.recorded));
        stop(&running.recorded).expect("stops");
        let _ = running.child.wait();
        assert!(!alive(&running.recorded));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_component_that_exits_early_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("xtask-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let component = Component {
            name: "quitter",
            program: PathBuf::from("/bin/sh"),
            args: vec![
                "-c".into(),
                "echo 'address already in use' >&2; exit 3".into(),
            ],
            log: dir.join("quitter.log"),
        };
        let mut running = spawn(&component).expect("spawns");
        let error = wait_ready(&mut running, Duration::from_secs(10), || false)
            .expect_err("it exits")
            .to_string();
        assert!(error.contains("quitter exited"), "{error}");
        assert!(error.contains("address already in use"), "{error}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
