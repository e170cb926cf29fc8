//! The orphan watchdog: a forked copy of the launcher that kills every rank's process group if the
//! launcher dies without saying goodbye (SIGKILL, OOM killer, a crash).
//!
//! `PR_SET_PDEATHSIG` (set in every rank) kills the rank's own process when the launcher dies, but
//! not the processes the rank started (data loaders, a shell's children). The watchdog covers them:
//! the launcher sends it each rank's process group id over a pipe; when the pipe reaches end of
//! file without the "disarm" word, the launcher is gone and the watchdog SIGKILLs every group.
//!
//! The watchdog is forked, not executed, so it needs no binary path; after the fork it uses only
//! async-signal-safe calls (read, kill, dup2, _exit) and no allocation, which keeps it sound even if
//! the launcher had other threads at the time of the fork.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use super::output::say;

/// The word that tells the watchdog the launcher ends normally (a process group id is never 0).
const DISARM: i32 = 0;
/// Most process groups one watchdog guards (ranks per node); more are still killed by PDEATHSIG.
const MAX_GROUPS: usize = 4096;
/// How long the launcher waits for a disarmed watchdog to exit.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// The launcher's end of the watchdog.
#[derive(Debug)]
pub(crate) struct Watchdog {
    pipe: Option<File>,
    pid: Pid,
}

impl Watchdog {
    /// Forks the watchdog. Call it early, before the launcher starts threads.
    pub(crate) fn start() -> nix::Result<Self> {
        // Both ends close on exec, so ranks never inherit them.
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC)?;
        // SAFETY: the child runs only `watch`, which makes async-signal-safe calls and never returns.
        match unsafe { fork() }? {
            ForkResult::Child => watch(read_end.as_raw_fd(), write_end.as_raw_fd()),
            ForkResult::Parent { child } => {
                drop(read_end);
                Ok(Self {
                    pipe: Some(File::from(write_end)),
                    pid: child,
                })
            }
        }
    }

    /// Adds a process group to those killed if the launcher dies.
    pub(crate) fn guard(&mut self, pgid: i32) {
        self.send(pgid);
    }

    /// Forgets a process group whose processes have all ended (a restarted job's earlier ranks),
    /// so that a later reuse of its number by another program is never killed.
    pub(crate) fn unguard(&mut self, pgid: i32) {
        if pgid > 0 {
            self.send(-pgid);
        }
    }

    fn send(&mut self, word: i32) {
        let Some(pipe) = self.pipe.as_mut() else { return };
        // Four bytes are below PIPE_BUF, so the write is atomic.
        if let Err(e) = pipe.write_all(&word.to_le_bytes()) {
            say(format_args!(
                "the orphan watchdog (pid {}) is gone ({e}); ranks' children may outlive a crash",
                self.pid
            ));
            self.pipe = None;
        }
    }

    /// Tells the watchdog the launcher ends normally, and reaps it.
    pub(crate) fn disarm(mut self) {
        self.send(DISARM);
        self.pipe = None;
        let deadline = Instant::now() + EXIT_WAIT;
        while Instant::now() < deadline {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
                _ => return,
            }
        }
        say(format_args!(
            "the orphan watchdog (pid {}) did not exit within {EXIT_WAIT:?}",
            self.pid
        ));
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropped without `disarm` (an early error return): closing the pipe makes the watchdog
        // kill every group it guards, so no rank outlives a launcher that gave up.
        self.pipe = None;
    }
}

/// The watchdog's whole life. Only async-signal-safe calls, no allocation, never returns.
fn watch(read_fd: RawFd, write_fd: RawFd) -> ! {
    let mut groups = [0i32; MAX_GROUPS];
    let mut count = 0usize;
    let mut word = [0u8; 4];
    let mut filled = 0usize;
    // SAFETY: every call below is async-signal-safe (POSIX list) and gets valid pointers into this
    // stack frame; the process ends in `_exit`, so no Rust destructor runs in the forked copy.
    unsafe {
        libc::close(write_fd);
        // Its own process group: the terminal's Ctrl-C must reach the launcher, not stop the watchdog.
        libc::setpgid(0, 0);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        // Let go of the launcher's stdout/stderr so whoever reads them sees end of file with the launcher.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
        loop {
            let n = libc::read(read_fd, word.as_mut_ptr().add(filled).cast(), word.len() - filled);
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break;
            }
            if n == 0 {
                break; // end of file: the launcher is gone
            }
            filled += n as usize; // n > 0 and at most word.len() - filled
            if filled < word.len() {
                continue;
            }
            filled = 0;
            let pgid = i32::from_le_bytes(word);
            if pgid == DISARM {
                libc::_exit(0);
            }
            if pgid > 0 && count < MAX_GROUPS {
                groups[count] = pgid;
                count += 1;
            } else if pgid < 0 {
                // Forget it: swap the last one into its place.
                let mut i = 0;
                while i < count {
                    if groups[i] == -pgid {
                        count -= 1;
                        groups[i] = groups[count];
                        break;
                    }
                    i += 1;
                }
            }
        }
        for &pgid in &groups[..count] {
            libc::kill(-pgid, libc::SIGKILL);
        }
        libc::_exit(0)
    }
}
