//! Which cgroup is a VMM's own, and writing a share of a CPU to it (and the saved limit back).

use std::path::{Path, PathBuf};

use super::{io, state::Saved, ThrottleError};

/// Why a cgroup of `pid`'s is not one the throttle may limit.
#[derive(Debug, thiserror::Error)]
pub enum NotOwn {
    #[error("{path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: Box<std::io::Error>,
    },
    #[error("its cgroup is {0:?}")]
    Unusable(String),
    #[error("its cgroup is the root")]
    Root,
    #[error("{} has no {limit} (no cpu controller there)", dir.display())]
    NoCpuController { dir: PathBuf, limit: &'static str },
    #[error("{} holds other processes too ({others})", dir.display())]
    Shared { dir: PathBuf, others: usize },
}

impl PartialEq for NotOwn {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (NotOwn::Unreadable { path: a, source: x }, NotOwn::Unreadable { path: b, source: y }) => {
                a == b && x.kind() == y.kind()
            }
            (NotOwn::Unusable(a), NotOwn::Unusable(b)) => a == b,
            (NotOwn::Root, NotOwn::Root) => true,
            (NotOwn::NoCpuController { dir: a, limit: x }, NotOwn::NoCpuController { dir: b, limit: y }) => {
                a == b && x == y
            }
            (NotOwn::Shared { dir: a, others: x }, NotOwn::Shared { dir: b, others: y }) => a == b && x == y,
            _ => false,
        }
    }
}

/// Every reason a VMM has no cgroup of its own (one per hierarchy looked at).
#[derive(Debug, PartialEq)]
pub struct NoOwnCgroup(pub Vec<NotOwn>);

impl std::fmt::Display for NoOwnCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no cgroup with a cpu controller");
        }
        for (i, why) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoOwnCgroup {}

/// Where the cgroup hierarchies are (tests point it elsewhere).
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub proc_root: PathBuf,
    /// cgroup2's mount point, if mounted.
    pub unified: Option<PathBuf>,
    /// The v1 hierarchy with the `cpu` controller: (mount point, its root within the hierarchy).
    pub cpu_v1: Option<(PathBuf, String)>,
}

impl Cgroups {
    /// From /proc/self/mountinfo.
    pub fn discover() -> Self {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (mut unified, mut cpu_v1) = (None, None);
        for line in text.lines() {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let f: Vec<&str> = line.split(' ').collect();
            let Some(dash) = f.iter().position(|x| *x == "-") else { continue };
            let (Some(root), Some(mnt), Some(fstype), Some(sopts)) =
                (f.get(3), f.get(4), f.get(dash + 1), f.get(dash + 3))
            else {
                continue;
            };
            match *fstype {
                "cgroup2" if unified.is_none() => unified = Some(PathBuf::from(unescape(mnt))),
                "cgroup" if cpu_v1.is_none() && sopts.split(',').any(|o| o == "cpu") => {
                    cpu_v1 = Some((PathBuf::from(unescape(mnt)), (*root).to_string()));
                }
                _ => {}
            }
        }
        Cgroups { proc_root: PathBuf::from("/proc"), unified, cpu_v1 }
    }

    /// The cgroup that holds `pid` and nothing else, and how to limit it; Err says why there is
    /// none (then: duty cycle).
    pub fn own(&self, pid: u32) -> Result<Own, NoOwnCgroup> {
        let path = self.proc_root.join(format!("{pid}/cgroup"));
        let text = std::fs::read_to_string(&path).map_err(|source| {
            NoOwnCgroup(vec![NotOwn::Unreadable { path: path.clone(), source: source.into() }])
        })?;
        let procs = |dir: &Path| std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        // cgroup.procs may list a process more than once (cgroup v2 on 6.1 does, per thread).
        // Kernel threads count as the VMM's: KVM puts a VM's worker kthreads (6.1's
        // kvm-nx-lpage-recovery) into its creator's cgroup.
        let pid_text = pid.to_string();
        let others = |dir: &Path| -> Vec<String> {
            procs(dir)
                .split_ascii_whitespace()
                .filter(|x| *x != pid_text && !self.is_kthread(x))
                .map(str::to_string)
                .collect()
        };
        let only_pid =
            |dir: &Path| procs(dir).split_ascii_whitespace().any(|x| x == pid_text) && others(dir).is_empty();
        let mut why = Vec::new();
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
            let cpu_v1 = ctrl.split(',').any(|c| c == "cpu");
            if !ctrl.is_empty() && !cpu_v1 {
                continue;
            }
            if path == "/" || path.contains("/..") {
                why.push(NotOwn::Unusable(path.to_string()));
                continue;
            }
            let (dir, limit, own): (PathBuf, &str, fn(PathBuf) -> Own) = if ctrl.is_empty() {
                let Some(mnt) = &self.unified else { continue };
                let mut dir = mnt.join(path.trim_start_matches('/'));
                // Threaded sub-groups (libvirt's vcpuN) belong to their domain: limit that.
                while std::fs::read_to_string(dir.join("cgroup.type")).is_ok_and(|t| t.trim() == "threaded") {
                    if !dir.pop() || !dir.starts_with(mnt) || dir == *mnt {
                        break;
                    }
                }
                if dir == *mnt {
                    why.push(NotOwn::Root);
                    continue;
                }
                (dir, "cpu.max", Own::V2)
            } else {
                let Some((mnt, root)) = &self.cpu_v1 else { continue };
                let rel = path.strip_prefix(root.as_str()).unwrap_or(path);
                (mnt.join(rel.trim_start_matches('/')), "cpu.cfs_quota_us", Own::V1)
            };
            if !dir.join(limit).exists() {
                why.push(NotOwn::NoCpuController { dir, limit });
            } else if !only_pid(&dir) {
                let n = others(&dir).len();
                why.push(NotOwn::Shared { dir, others: n });
            } else {
                return Ok(own(dir));
            }
        }
        Err(NoOwnCgroup(why))
    }

    /// True for a kernel thread (PF_KTHREAD in /proc/PID/stat's flags).
    fn is_kthread(&self, pid: &str) -> bool {
        const PF_KTHREAD: u64 = 0x0020_0000;
        let stat = std::fs::read(self.proc_root.join(pid).join("stat")).unwrap_or_default();
        // Field 9: flags.
        crate::host::procfs::stat_field(&stat, 9).is_some_and(|f| f & PF_KTHREAD != 0)
    }
}

/// mountinfo escapes spaces and such as octal (`\040`).
pub(super) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup the VMM has to itself, by hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Own {
    V2(PathBuf),
    V1(PathBuf),
}

pub fn read_trim(path: &Path) -> Result<String, ThrottleError> {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(io(path))
}

fn write_file(path: &Path, text: &str) -> Result<(), ThrottleError> {
    std::fs::write(path, text).map_err(io(path))
}

/// Sets a share of a CPU on a throttled cgroup.
pub fn apply_share(saved: &Saved, share: f64, period: u64) -> Result<(), ThrottleError> {
    let quota = ((share * period as f64) as u64).max(1000);
    match saved {
        Saved::CpuMax { dir, .. } => write_file(&dir.join("cpu.max"), &format!("{quota} {period}")),
        Saved::CfsQuota { dir, .. } => {
            // v1 checks the pair at each write: the period is changed without a quota.
            let (q, p) = (dir.join("cpu.cfs_quota_us"), dir.join("cpu.cfs_period_us"));
            if read_trim(&p)? != period.to_string() {
                write_file(&q, "-1")?;
                write_file(&p, &period.to_string())?;
            }
            write_file(&q, &quota.to_string())
        }
        Saved::DutyCycle => Ok(()),
    }
}

/// Writes a saved cgroup limit back. A cgroup that no longer exists needs nothing.
pub fn put_back(saved: &Saved) -> Result<(), ThrottleError> {
    match saved {
        Saved::CpuMax { dir, previous } if dir.exists() => write_file(&dir.join("cpu.max"), previous),
        Saved::CfsQuota { dir, period, quota } if dir.exists() => {
            // -1 (no limit) first, so that any period is accepted, then the saved pair.
            write_file(&dir.join("cpu.cfs_quota_us"), "-1")?;
            write_file(&dir.join("cpu.cfs_period_us"), period)?;
            write_file(&dir.join("cpu.cfs_quota_us"), quota)
        }
        _ => Ok(()),
    }
}
