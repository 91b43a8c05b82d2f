//! Running COMMAND: in a process group of its own, with SIGTERM/SIGINT forwarded to the
//! group, SIGKILL after `--kill-after`, and the whole group killed when the lock is lost or
//! herdlock drops the run.

use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::signal::unix::{signal, SignalKind};

use crate::output::{Capture, Captured};

/// How a run of COMMAND ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It exited with this code.
    Exited(u8),
    /// A signal (this number) killed it, not sent by herdlock.
    Killed(i32),
    /// herdlock got this signal, forwarded it and waited for the group (SIGKILL after
    /// `--kill-after`).
    Interrupted(i32),
    /// The lock (or permit) was lost; the group got SIGKILL.
    Lost,
}

impl Ended {
    /// What a shell would say: the code, or 128 + the signal. `Lost` has no such code: the
    /// caller maps it to [`crate::exit::LOST`].
    pub(crate) fn code(self) -> u8 {
        match self {
            Ended::Exited(code) => code,
            Ended::Killed(n) | Ended::Interrupted(n) => signal_code(n),
            Ended::Lost => crate::exit::LOST,
        }
    }

    /// [`Ended::code`] as the process's exit code.
    pub(crate) fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }

    fn of(status: ExitStatus) -> Ended {
        match (status.code(), status.signal()) {
            (Some(code), _) => Ended::Exited(u8::try_from(code).unwrap_or(1)),
            (None, Some(n)) => Ended::Killed(n),
            (None, None) => Ended::Exited(1),
        }
    }
}

/// 128 + the signal's number, like a shell.
pub(crate) fn signal_code(n: i32) -> u8 {
    u8::try_from(128 + n).unwrap_or(u8::MAX)
}

/// SIGTERM and SIGINT, listened for from start to end (their default action, dying, would
/// orphan COMMAND and leave the lock held until its TTL).
#[derive(Debug)]
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal's number.
    pub(crate) async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM as i32,
            _ = self.int.recv() => Signal::SIGINT as i32,
        }
    }
}

/// A spawned COMMAND. Dropped before it was reaped (the run was cancelled: `once` lost its
/// lock), its whole process group gets SIGKILL and the child goes to [`reap_dropped`].
struct Group {
    /// `None` only once dropped.
    child: Option<Child>,
    pgid: Pid,
    reaped: bool,
}

/// Children killed by a [`Group`]'s drop, to be reaped before herdlock exits.
static DROPPED: std::sync::Mutex<Vec<Child>> = std::sync::Mutex::new(Vec::new());

/// Reaps every child a cancelled run killed (up to `limit` in all), so that none outlives
/// herdlock, not even as a zombie.
pub(crate) async fn reap_dropped(limit: Duration) {
    let children = std::mem::take(
        &mut *DROPPED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let _ = tokio::time::timeout(limit, async {
        for mut child in children {
            let _ = child.wait().await;
        }
    })
    .await;
}

impl Group {
    fn spawn(command: &[String], capture: bool) -> io::Result<Group> {
        let (program, args) = command
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command given"))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).process_group(0).kill_on_drop(true);
        if capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| io::Error::other("the command exited before it had a pid"))?;
        Ok(Group {
            child: Some(child),
            pgid: Pid::from_raw(pid),
            reaped: false,
        })
    }

    fn signal(&self, signal: Signal) {
        // ESRCH: every process of the group is gone already.
        let _ = killpg(self.pgid, signal);
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("a live group has its child")
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child().wait().await?;
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(Signal::SIGKILL);
            if let Some(child) = self.child.take() {
                DROPPED
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(child);
            }
        }
    }
}

/// Runs `command` with herdlock's stdin, stdout and stderr, until it exits, `lost` resolves
/// (the group gets SIGKILL: someone else may hold the lock now) or a signal arrives (see
/// [`interrupt`]).
///
/// # Errors
///
/// When the command cannot be started.
pub(crate) async fn run(
    command: &[String],
    lost: impl Future<Output = ()>,
    signals: &mut Signals,
    kill_after: Duration,
) -> io::Result<Ended> {
    let mut group = Group::spawn(command, false)?;
    supervise(&mut group, lost, signals, kill_after).await
}

/// Runs `command` like [`run`] (never lost: a fan-out job is cancelled by dropping it),
/// streaming its stdout and stderr to ours live while keeping up to `cap` bytes of both.
///
/// # Errors
///
/// When the command cannot be started.
pub(crate) async fn run_captured(
    command: &[String],
    cap: usize,
    signals: &mut Signals,
    kill_after: Duration,
) -> io::Result<(Ended, Captured)> {
    let mut group = Group::spawn(command, true)?;
    let capture = Capture::new(cap);
    let stdout = group.child().stdout.take().map(|out| {
        let capture = capture.clone();
        tokio::spawn(async move { capture.pump(out, tokio::io::stdout(), true).await })
    });
    let stderr = group.child().stderr.take().map(|err| {
        let capture = capture.clone();
        tokio::spawn(async move { capture.pump(err, tokio::io::stderr(), false).await })
    });
    let ended = supervise(&mut group, std::future::pending(), signals, kill_after).await?;
    // The pipes close when every process holding them has exited; a process COMMAND left
    // behind may hold them open for good, so that wait is bounded too.
    let pumps: Vec<_> = [stdout, stderr].into_iter().flatten().collect();
    let aborts: Vec<_> = pumps
        .iter()
        .map(tokio::task::JoinHandle::abort_handle)
        .collect();
    let drained = tokio::time::timeout(kill_after, async {
        for pump in pumps {
            let _ = pump.await;
        }
    })
    .await;
    let mut captured = capture.finish();
    if drained.is_err() {
        aborts.iter().for_each(tokio::task::AbortHandle::abort);
        captured.mark_incomplete();
        eprintln!(
            "herdlock: the command exited, but a process it started still holds its output \
             open after {}; not waiting for the rest",
            humantime::format_duration(kill_after)
        );
    }
    Ok((ended, captured))
}

async fn supervise(
    group: &mut Group,
    lost: impl Future<Output = ()>,
    signals: &mut Signals,
    kill_after: Duration,
) -> io::Result<Ended> {
    tokio::select! {
        status = group.wait() => Ok(Ended::of(status?)),
        () = lost => {
            group.signal(Signal::SIGKILL);
            group.wait().await?;
            Ok(Ended::Lost)
        }
        n = signals.recv() => interrupt(group, n, signals, kill_after).await,
    }
}

/// Forwards signal `n` to the group, waits for COMMAND to exit (forwarding further
/// signals), and sends SIGKILL to the group if it has not exited after `kill_after`.
async fn interrupt(
    group: &mut Group,
    n: i32,
    signals: &mut Signals,
    kill_after: Duration,
) -> io::Result<Ended> {
    let forward = Signal::try_from(n).unwrap_or(Signal::SIGTERM);
    group.signal(forward);
    let deadline = tokio::time::sleep(kill_after);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            status = group.wait() => {
                status?;
                return Ok(Ended::Interrupted(n));
            }
            () = &mut deadline => {
                group.signal(Signal::SIGKILL);
                group.wait().await?;
                return Ok(Ended::Interrupted(n));
            }
            again = signals.recv() => {
                group.signal(Signal::try_from(again).unwrap_or(Signal::SIGTERM));
            }
        }
    }
}
