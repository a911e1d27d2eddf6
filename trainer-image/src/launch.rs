//! Several ranks in one pod: one trainer process per GPU.
//!
//! A gang pod with `KUBETUNE_RANKS_PER_POD` above 1 (a node's 8 GPUs, or several CPU
//! ranks for tests) starts the trainer once; that process is the pod's launcher. It
//! starts one trainer per local rank — the same binary and arguments, with
//! `KUBETUNE_LOCAL_RANK` (the CUDA device it drives) and `KUBETUNE_RANK` = node rank ×
//! ranks per pod + local rank — and supervises them, like torchrun's agent:
//! - the first rank to fail (a non-zero exit not asked for by SIGTERM) has its pod's
//!   other ranks killed at once and the launcher exits with that rank's code, so the
//!   pod fails promptly and the operator restarts the gang from its checkpoint; the
//!   other pods' ranks notice the broken gang at their next collective;
//! - SIGTERM (the pod being deleted, suspended or over budget) is passed on to every
//!   rank, which checkpoint after the current step as one process would; the launcher
//!   waits for all of them and exits with the first non-zero code (143);
//! - all ranks exiting 0 is success (global rank 0 wrote the outputs and the
//!   termination message).
//!
//! Only local rank 0 serves progress on the pod's address; the others serve on an
//! ephemeral loopback port.

use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::time::Duration;

use kubetune_crds::training::contract;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// How often the launcher looks at its ranks.
const POLL: Duration = Duration::from_millis(50);

/// This pod's place in the gang, when it runs several ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRanks {
    /// The pod's index in the gang (`KUBETUNE_NODE_RANK`).
    pub node_rank: usize,
    /// Ranks in each pod (`KUBETUNE_RANKS_PER_POD`).
    pub ranks_per_pod: usize,
}

impl PodRanks {
    /// The global rank of local rank `local`.
    pub fn rank_of(&self, local: usize) -> usize {
        self.node_rank * self.ranks_per_pod + local
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn number(name: &str) -> Result<Option<usize>> {
    var(name)
        .map(|v| {
            v.parse()
                .map_err(|_| Error::invalid(format!("{name} {v:?} is not a number")))
        })
        .transpose()
}

/// The ranks this process must launch: `Some` when it is a pod's launcher (more than
/// one rank per pod, and it is not itself one of them).
pub fn launcher_from_env() -> Result<Option<PodRanks>> {
    let ranks_per_pod = number(contract::ENV_RANKS_PER_POD)?.unwrap_or(1);
    if ranks_per_pod <= 1 || var(contract::ENV_LOCAL_RANK).is_some() {
        return Ok(None);
    }
    let node_rank = number(contract::ENV_NODE_RANK)?.ok_or_else(|| {
        Error::invalid(format!(
            "{} is needed with {} {ranks_per_pod}",
            contract::ENV_NODE_RANK,
            contract::ENV_RANKS_PER_POD
        ))
    })?;
    Ok(Some(PodRanks {
        node_rank,
        ranks_per_pod,
    }))
}

/// This process' index among its pod's ranks (0 when it is the pod's only one).
pub fn local_rank() -> Result<usize> {
    Ok(number(contract::ENV_LOCAL_RANK)?.unwrap_or(0))
}

/// The variable candle's CPU kernels (and rayon) size their thread pools by.
const RAYON_NUM_THREADS: &str = "RAYON_NUM_THREADS";

/// The compute threads each of `ranks` CPU ranks of a pod gets: the pod's cores (the
/// cgroup's CPU quota, which `available_parallelism` reads) shared out, at least one
/// each; `None` when the pod sets `RAYON_NUM_THREADS` itself. Without it every rank
/// would start a thread per core, `ranks` times more threads than cores.
fn threads_per_rank(ranks: usize) -> Option<usize> {
    if var(RAYON_NUM_THREADS).is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(share_cores(cores, ranks))
}

fn share_cores(cores: usize, ranks: usize) -> usize {
    (cores / ranks.max(1)).max(1)
}

/// The exit code a shell would report for `status`: the code, or 128 + the signal.
fn code_of(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(crate::EXIT_RETRYABLE)
}

/// Starts the pod's ranks and supervises them (see the module docs); returns the
/// code the pod should exit with.
pub async fn run(pod: PodRanks) -> Result<i32> {
    let exe = std::env::current_exe().map_err(|err| Error::Io {
        action: "find",
        path: "the trainer's own executable".into(),
        source: err,
    })?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|err| Error::Io {
            action: "watch",
            path: "SIGTERM".into(),
            source: err,
        })?;
    let threads = threads_per_rank(pod.ranks_per_pod);
    let mut ranks: Vec<Child> = Vec::with_capacity(pod.ranks_per_pod);
    for local in 0..pod.ranks_per_pod {
        let mut command = Command::new(&exe);
        command
            .args(std::env::args_os().skip(1))
            .env(contract::ENV_LOCAL_RANK, local.to_string())
            .env(contract::ENV_RANK, pod.rank_of(local).to_string())
            .kill_on_drop(true);
        if local > 0 {
            command.env(contract::ENV_PROGRESS_ADDR, "127.0.0.1:0");
        }
        if let Some(threads) = threads {
            command.env(RAYON_NUM_THREADS, threads.to_string());
        }
        let child = command.spawn().map_err(|err| Error::Io {
            action: "start",
            path: exe.clone(),
            source: err,
        })?;
        ranks.push(child);
    }
    tracing::info!(
        node_rank = pod.node_rank,
        ranks = pod.ranks_per_pod,
        first_rank = pod.rank_of(0),
        "started this pod's ranks"
    );
    let mut codes: Vec<Option<i32>> = vec![None; ranks.len()];
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = term.recv(), if !stopping => {
                stopping = true;
                tracing::warn!("termination requested: passing it on to this pod's ranks");
                signal_all(&ranks, &codes, Signal::SIGTERM);
            }
            () = tokio::time::sleep(POLL) => {}
        }
        for (local, child) in ranks.iter_mut().enumerate() {
            if codes[local].is_none()
                && let Some(status) = child.try_wait().map_err(|err| Error::Io {
                    action: "wait for",
                    path: format!("local rank {local}").into(),
                    source: err,
                })?
            {
                codes[local] = Some(code_of(status));
            }
        }
        if !stopping
            && let Some((local, code)) = codes
                .iter()
                .enumerate()
                .find_map(|(local, code)| code.filter(|&c| c != 0).map(|c| (local, c)))
        {
            tracing::error!(
                rank = pod.rank_of(local),
                local_rank = local,
                code,
                "a rank failed: stopping this pod's other ranks"
            );
            for (other, child) in ranks.iter_mut().enumerate() {
                if codes[other].is_none() {
                    // Already gone is fine: it is being reaped next.
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
            return Ok(code);
        }
        if codes.iter().all(Option::is_some) {
            return Ok(codes
                .iter()
                .flatten()
                .copied()
                .find(|&c| c != 0)
                .unwrap_or(0));
        }
    }
}

/// Sends `signal` to every rank still running.
fn signal_all(ranks: &[Child], codes: &[Option<i32>], signal: Signal) {
    for (child, code) in ranks.iter().zip(codes) {
        if code.is_none()
            && let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok())
        {
            // A rank that exited meanwhile is reaped by the poll.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_cores_are_shared_out_among_its_ranks_at_least_one_each() {
        assert_eq!(share_cores(16, 8), 2);
        assert_eq!(share_cores(2, 2), 1);
        assert_eq!(share_cores(7, 2), 3);
        assert_eq!(share_cores(2, 4), 1);
        assert_eq!(share_cores(4, 0), 4);
    }

    #[test]
    fn global_ranks_number_each_pods_ranks_after_the_pods_before_it() {
        let pod = PodRanks {
            node_rank: 3,
            ranks_per_pod: 8,
        };
        assert_eq!(pod.rank_of(0), 24);
        assert_eq!(pod.rank_of(7), 31);
    }

    #[test]
    fn signals_and_codes_read_as_a_shell_reports_them() {
        assert_eq!(code_of(ExitStatus::from_raw(0)), 0);
        assert_eq!(code_of(ExitStatus::from_raw(2 << 8)), 2);
        // Killed by SIGKILL (9) and SIGTERM (15).
        assert_eq!(code_of(ExitStatus::from_raw(9)), 137);
        assert_eq!(code_of(ExitStatus::from_raw(15)), 143);
    }
}
