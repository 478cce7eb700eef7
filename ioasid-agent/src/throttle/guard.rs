//! The duty cycle's dead man's switch. A VMM the duty cycle stopped must not stay stopped when
//! the agent dies in the off phase (SIGKILL, a crash, the OOM killer): the next agent may never
//! come, or come with another `--throttle-state` and not know. So, with the first duty cycle, the
//! agent starts a guard process (`ioasid-agent duty-guard`, hidden) and tells it over a pipe of
//! every stop and continue. When the pipe closes (the agent is gone, however it went), the guard
//! continues every VMM the cycle still held stopped, unless the kernel holds it for an
//! incoherent-DMA decision (the asks map, inherited) or someone else stopped it meanwhile (a stop
//! signal pending while it is stopped), then exits. An agent that exits cleanly has continued
//! them all before: the guard then has nothing to do.
//!
//! The guard ignores SIGTERM and SIGINT (a service stop sends them to every process of the unit:
//! the agent puts everything back and closes the pipe); SIGKILL of both at once (a container's
//! end, `systemctl kill -s KILL`) still leaves a VMM stopped in the off phase, as before.

use std::{
    collections::HashSet,
    io::{BufRead, Write},
    os::fd::{AsRawFd, BorrowedFd},
    process::{Child, ChildStdin, Command, Stdio},
    sync::Mutex,
};

use crate::{
    engine::ports::AskGate,
    host::{pidfd::Pidfd, procfs::ProcFs, sys::Signal},
};

/// SIGSTOP, SIGTSTP, SIGTTIN and SIGTTOU in a /proc signal mask (bit `signo - 1`).
pub const STOP_SIGNALS: u64 = 0xf << 18;

/// The agent's end: a pipe to the guard process.
pub struct Guard {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
}

impl Guard {
    /// Starts the guard (this executable, `duty-guard`), handing it the asks map's fd.
    /// `/proc/self/exe`: the binary this agent runs, even if an upgrade replaced it on disk.
    pub fn spawn(asks: Option<BorrowedFd<'_>>) -> std::io::Result<Guard> {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("duty-guard").stdin(Stdio::piped()).stdout(Stdio::null());
        if let Some(fd) = asks {
            let raw = fd.as_raw_fd();
            cmd.arg("--asks-fd").arg(raw.to_string());
            // SAFETY: between fork and exec, only fcntl(2) on an fd the child inherited: it
            // stays open across exec in the child alone.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        Ok(Guard { stdin: Mutex::new(stdin), child: Mutex::new(child) })
    }

    /// The duty cycle stopped (`stopped`) or continued the process (pid, start).
    pub fn tell(&self, pid: u32, start: u64, stopped: bool) {
        let mut g = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stdin) = g.as_mut() else { return };
        let word = if stopped { "stop" } else { "cont" };
        if let Err(e) = writeln!(stdin, "{word} {pid} {start}") {
            tracing::error!(error = %e, "the duty cycle's guard is gone: a VMM stopped by the duty cycle when the agent dies stays stopped");
            *g = None;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Closing the pipe is the guard's signal. It is reaped if it is done already; an agent
        // that exits never waits for it.
        drop(self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..50 {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// The guard process: follows the stops and continues read from `input` until it ends, then
/// continues every process still held stopped (see the module). Returns the processes it
/// continued.
pub fn run(input: impl BufRead, procfs: &ProcFs, gate: Option<&dyn AskGate>) -> Vec<u32> {
    let mut held: HashSet<(u32, u64)> = HashSet::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        let mut f = line.split_ascii_whitespace();
        let (Some(word), Some(pid), Some(start)) = (f.next(), f.next(), f.next()) else { continue };
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { continue };
        match word {
            "stop" => held.insert((pid, start)),
            "cont" => held.remove(&(pid, start)),
            _ => false,
        };
    }
    let mut continued = Vec::new();
    for (pid, start) in held {
        let Some(fd) = Pidfd::open(procfs, pid, start) else { continue };
        if gate.is_some_and(|g| g.asked(pid)) {
            tracing::info!(pid, "the agent is gone: a VMM the duty cycle held is stopped for an incoherent-DMA decision; left for the next agent");
            continue;
        }
        if stopped_by_another(procfs, pid) {
            tracing::info!(
                pid,
                "the agent is gone: a VMM the duty cycle held was stopped by someone else too; left stopped"
            );
            continue;
        }
        match fd.signal(Signal::Cont) {
            Ok(()) => {
                tracing::warn!(pid, "the agent is gone: a VMM its duty cycle held stopped is continued");
                continued.push(pid);
            }
            Err(e) => tracing::error!(pid, error = %e, "continuing a VMM the duty cycle held stopped"),
        }
    }
    continued
}

/// The process is stopped with a stop signal pending: someone sent one while it was stopped.
pub fn stopped_by_another(procfs: &ProcFs, pid: u32) -> bool {
    status(procfs, pid).is_some_and(|(state, pending)| state == 'T' && pending & STOP_SIGNALS != 0)
}

/// A process's state letter and its process-wide pending signals (/proc/PID/status).
pub fn status(procfs: &ProcFs, pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(procfs.path(pid, "status")).ok()?;
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let state = field("State:")?.chars().next()?;
    let pending = u64::from_str_radix(field("ShdPnd:")?, 16).ok()?;
    Some((state, pending))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> (std::process::Child, u32, u64) {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let start = ProcFs::at("/proc").start_time(pid).unwrap();
        (child, pid, start)
    }

    fn signal(pid: u32, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, sig) };
    }

    fn wait_state(pid: u32, want: char) -> bool {
        (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            ProcFs::at("/proc").state(pid) == Some(want)
        })
    }

    /// The agent dies with a VMM stopped by its duty cycle: the guard continues it. One it
    /// continued before, one someone else stopped too, and one the kernel holds for a decision
    /// are left as they are.
    #[test]
    fn the_guard_continues_what_the_duty_cycle_held_when_the_agent_dies() {
        struct Asked(u32);
        impl AskGate for Asked {
            fn asked(&self, pid: u32) -> bool {
                pid == self.0
            }
        }
        let procfs = ProcFs::at("/proc");
        let (mut held, hp, hs) = sleeper();
        let (mut resumed, rp, rs) = sleeper();
        let (mut operator, op, os) = sleeper();
        let (mut asked, ap, as_) = sleeper();
        for p in [hp, rp, op, ap] {
            signal(p, libc::SIGSTOP);
            assert!(wait_state(p, 'T'));
        }
        // The operator stops it again while the duty cycle holds it.
        signal(op, libc::SIGSTOP);
        let input = format!(
            "stop {hp} {hs}\nstop {rp} {rs}\ncont {rp} {rs}\nstop {op} {os}\nstop {ap} {as_}\ngarbage\nstop x 1\n"
        );
        let continued = run(std::io::Cursor::new(input), &procfs, Some(&Asked(ap)));
        assert_eq!(continued, vec![hp]);
        assert!(wait_state(hp, 'S'), "the held VMM is continued");
        std::thread::sleep(std::time::Duration::from_millis(50));
        for p in [rp, op, ap] {
            assert_eq!(procfs.state(p), Some('T'), "{p} must be left stopped");
        }
        for c in [&mut held, &mut resumed, &mut operator, &mut asked] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
