//! libvirt's live status of a domain (`/run/libvirt/qemu/<domain>.xml`): whether libvirt
//! started a VMM, and what OpenStack Nova calls the server it runs (`<nova:instance>` in the
//! domain's metadata: name, project, user, flavor). Nova names every domain
//! `instance-0000002a`; an alert that says so sends the operator elsewhere to learn whose VM
//! it is.
//!
//! Trust: the file is libvirt's (root's directory) and it names the VMM by pid
//! (`<domstatus pid=>`); a VMM whose command line says `-name guest=instance-0000002a` but whose
//! pid the file does not name gets nothing from it. libvirt writes the status before QEMU
//! execs (its "early domain status"), so it is there when the agent first sees the VMM.
//!
//! Bounded: a regular file only (never a FIFO or a link), at most `MAX_BYTES`, no DTD (no
//! entities), at most `MAX_NODES` nodes, each value cut to `MAX_VALUE` bytes with control
//! characters replaced. Read on a thread of its own (`Reader`): the event loop never waits for
//! a file; a slow file system fills the reader's queue and lookups are dropped, said once.

use std::{
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where the system libvirtd (and virtqemud) keeps each running domain's status.
pub const RUN_DIR: &str = "/run/libvirt/qemu";
/// A status file holds the domain's whole definition and QEMU's capabilities: tens of KB.
pub const MAX_BYTES: u64 = 4 << 20;
const MAX_NODES: u32 = 200_000;
/// A Nova field as a label value: names are at most 255 characters in Nova's API.
pub const MAX_VALUE: usize = 255;
/// Nova's metadata namespace (`.../nova/1.1` today; any version is read).
const NOVA_NS: &str = "http://openstack.org/xmlns/libvirt/nova/";

/// What OpenStack Nova knows a server by. Missing is None, never guessed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nova {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub owner: Owner,
}

/// Whose a Nova server is, and its flavor (beside a VM's name in its records: `VmIdentity`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
}

/// A running domain as libvirt's status names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub uuid: Option<String>,
    pub nova: Option<Nova>,
}

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("{0:?} cannot be a libvirt domain's file name")]
    BadName(String),
    #[error("no libvirt status for the domain ({path})")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: over {MAX_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path} is the status of pid {theirs}, not of this VMM (pid {ours})")]
    NotThisVmm { path: PathBuf, theirs: String, ours: u32 },
}

/// A libvirt domain name is a file name in `dir`: one path component, no NUL.
fn file_of(dir: &Path, domain: &str) -> Result<PathBuf, LibvirtError> {
    let bad = domain.is_empty()
        || domain.len() > 250
        || domain == "."
        || domain == ".."
        || domain.contains(['/', '\0']);
    if bad {
        return Err(LibvirtError::BadName(domain.to_string()));
    }
    Ok(dir.join(format!("{domain}.xml")))
}

/// Reads the status of `domain` in `dir` and returns it if it names `pid` as its VMM.
pub fn read(dir: &Path, domain: &str, pid: u32) -> Result<Domain, LibvirtError> {
    let path = file_of(dir, domain)?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => LibvirtError::Missing { path: path.clone() },
        _ => LibvirtError::Read { path: path.clone(), source },
    };
    // Never a FIFO's endless read, never a link's target.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(LibvirtError::NotAFile { path });
    }
    let mut text = String::new();
    file.take(MAX_BYTES + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > MAX_BYTES {
        return Err(LibvirtError::TooLarge { path });
    }
    parse(&text, domain, pid).map_err(|what| match what {
        Parsed::Malformed(what) => LibvirtError::Malformed { path, what },
        Parsed::Other(theirs) => LibvirtError::NotThisVmm { path, theirs, ours: pid },
    })
}

enum Parsed {
    Malformed(String),
    /// The status of another pid (or of none: a domain not running).
    Other(String),
}

fn parse(text: &str, domain: &str, pid: u32) -> Result<Domain, Parsed> {
    let opt = roxmltree::ParsingOptions { allow_dtd: false, nodes_limit: MAX_NODES };
    let doc =
        roxmltree::Document::parse_with_options(text, opt).map_err(|e| Parsed::Malformed(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domstatus") {
        return Err(Parsed::Malformed(format!("<{}>, not <domstatus>", clean(root.tag_name().name()))));
    }
    let theirs = root.attribute("pid").unwrap_or("");
    if theirs.parse::<u32>().ok() != Some(pid) {
        return Err(Parsed::Other(clean(theirs)));
    }
    let dom = child(root, "domain").ok_or_else(|| Parsed::Malformed("no <domain>".into()))?;
    let name = child(dom, "name").and_then(|n| n.text()).unwrap_or("");
    if name != domain {
        return Err(Parsed::Malformed(format!("the domain is {:?}, not {:?}", clean(name), clean(domain))));
    }
    let uuid = child(dom, "uuid")
        .and_then(|u| u.text())
        .map(str::trim)
        .filter(|u| crate::host::procfs::well_formed_uuid(u))
        .map(str::to_ascii_lowercase);
    let nova = child(dom, "metadata").and_then(|m| {
        m.children().find(|n| {
            n.has_tag_name("instance") && n.tag_name().namespace().is_some_and(|ns| ns.starts_with(NOVA_NS))
        })
    });
    Ok(Domain { uuid, nova: nova.map(nova_of) })
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

fn nova_of(inst: roxmltree::Node<'_, '_>) -> Nova {
    let text = |n: Option<roxmltree::Node<'_, '_>>| n.and_then(|n| n.text()).map(str::trim).and_then(value);
    let owner = child(inst, "owner");
    let (user, project) = (owner.and_then(|o| child(o, "user")), owner.and_then(|o| child(o, "project")));
    Nova {
        name: text(child(inst, "name")),
        owner: Owner {
            project: text(project),
            project_id: project.and_then(|p| p.attribute("uuid")).and_then(value),
            user: text(user),
            user_id: user.and_then(|u| u.attribute("uuid")).and_then(value),
            flavor: child(inst, "flavor").and_then(|f| f.attribute("name")).and_then(value),
        },
    }
}

/// A field as a label value: at most `MAX_VALUE` bytes (on a character boundary), control
/// characters replaced; empty is None.
fn value(s: &str) -> Option<String> {
    let s = clean(s);
    (!s.is_empty()).then_some(s)
}

fn clean(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }) {
        if out.len() + c.len_utf8() > MAX_VALUE {
            break;
        }
        out.push(c);
    }
    out
}

/// A lookup: the VMM, and whether its cgroup says libvirt started it (then a missing status is
/// looked for again, in case a libvirt writes it late).
#[derive(Debug, Clone)]
pub struct Lookup {
    pub pid: u32,
    pub start_time: u64,
    pub domain: String,
    pub libvirt_cgroup: bool,
}

/// A lookup's answer: the domain, if libvirt's status names this VMM.
#[derive(Debug)]
pub struct Found {
    pub pid: u32,
    pub start_time: u64,
    pub domain: Domain,
}

/// The thread that reads libvirt's status files, and its queues.
pub struct Reader {
    ask: mpsc::SyncSender<Lookup>,
    answers: mpsc::Receiver<Found>,
    /// Answers taken off the queue before they were asked for (`wait`).
    taken: Vec<Found>,
    full: bool,
}

/// How many lookups may wait: a host starting hundreds of VMs at once.
const QUEUE: usize = 1024;

impl Reader {
    /// Starts the reader on `dir`. None if no thread could be started (then no VM gets an
    /// identity from libvirt's status; said).
    pub fn start(dir: PathBuf) -> Option<Reader> {
        let (ask, asks) = mpsc::sync_channel::<Lookup>(QUEUE);
        let (tell, answers) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("libvirt-status".into())
            .spawn(move || serve(&dir, &asks, &tell));
        match spawned {
            Ok(_) => Some(Reader { ask, answers, taken: Vec::new(), full: false }),
            Err(e) => {
                tracing::warn!(error = %e, "no thread to read libvirt's domain status: VMs get no OpenStack identity");
                None
            }
        }
    }

    /// Asks for `l` (never waits: with the queue full, the lookup is dropped and said once
    /// per filling).
    pub fn ask(&mut self, l: Lookup) {
        match self.ask.try_send(l) {
            Ok(()) => self.full = false,
            Err(mpsc::TrySendError::Full(l)) => {
                if !std::mem::replace(&mut self.full, true) {
                    tracing::warn!(pid = l.pid, "libvirt's status reader is behind ({QUEUE} lookups waiting): this VM and others get no libvirt identity");
                }
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }

    /// The answers so far.
    pub fn answers(&mut self) -> Vec<Found> {
        let mut out = std::mem::take(&mut self.taken);
        out.extend(self.answers.try_iter());
        out
    }

    /// Waits up to `within` for the next answer, kept for `answers`.
    #[cfg(test)]
    pub fn wait(&mut self, within: Duration) -> bool {
        let got = self.answers.recv_timeout(within).ok();
        let some = got.is_some();
        self.taken.extend(got);
        some
    }
}

/// Each lookup once; one whose cgroup says libvirt again after 1 s and 5 s if its status was
/// missing or named another pid.
fn serve(dir: &Path, asks: &mpsc::Receiver<Lookup>, tell: &mpsc::Sender<Found>) {
    let mut later: Vec<(std::time::Instant, Lookup, u32)> = Vec::new();
    loop {
        let wait =
            later.iter().map(|(at, _, _)| at.saturating_duration_since(std::time::Instant::now())).min();
        let next = match wait {
            Some(w) => match asks.recv_timeout(w) {
                Ok(l) => Some((l, 0)),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
            None => match asks.recv() {
                Ok(l) => Some((l, 0)),
                Err(_) => return,
            },
        };
        let mut due: Vec<(Lookup, u32)> = next.into_iter().collect();
        let now = std::time::Instant::now();
        let (ready, wait): (Vec<_>, Vec<_>) = later.drain(..).partition(|(at, _, _)| *at <= now);
        later = wait;
        due.extend(ready.into_iter().map(|(_, l, n)| (l, n)));
        for (l, tries) in due {
            match read(dir, &l.domain, l.pid) {
                Ok(domain) => {
                    tracing::debug!(pid = l.pid, domain = %crate::util::text::escape(&l.domain), nova = domain.nova.is_some(), "libvirt's status names this VMM");
                    if tell.send(Found { pid: l.pid, start_time: l.start_time, domain }).is_err() {
                        return;
                    }
                }
                Err(e @ (LibvirtError::Missing { .. } | LibvirtError::NotThisVmm { .. }))
                    if l.libvirt_cgroup && tries < 2 =>
                {
                    tracing::debug!(pid = l.pid, error = %e, "libvirt's status not (yet) this VMM's: looked for again");
                    let after = if tries == 0 { Duration::from_secs(1) } else { Duration::from_secs(5) };
                    later.push((now + after, l, tries + 1));
                }
                Err(LibvirtError::Missing { .. }) => {}
                Err(e) => {
                    tracing::info!(pid = l.pid, error = %e, "libvirt's status of a VM's domain not used")
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const STATUS: &str = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE.
-->
<domstatus state='running' reason='booted' pid='4242'>
  <monitor path='/var/lib/libvirt/qemu/domain-1-instance-0000002a/monitor.sock' type='unix'/>
  <vcpus><vcpu id='0' pid='4250'/></vcpus>
  <domain type='kvm' id='1'>
    <name>instance-0000002a</name>
    <uuid>4C2A0001-1B2C-4D3E-8F40-000000000001</uuid>
    <metadata>
      <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
        <nova:package version="27.1.0"/>
        <nova:name>gpu-train-7</nova:name>
        <nova:flavor name="g1.a100x1"><nova:memory>16</nova:memory></nova:flavor>
        <nova:owner>
          <nova:user uuid="5f1b2c3d4e5f40718293a4b5c6d7e8f9">alice</nova:user>
          <nova:project uuid="0a1b2c3d4e5f40718293a4b5c6d7e8f0">ml-research</nova:project>
        </nova:owner>
      </nova:instance>
    </metadata>
  </domain>
</domstatus>
"#;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ioasid-libvirt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn novas_identity_is_read_for_the_vmm_the_status_names() {
        let d = dir("nova");
        std::fs::write(d.join("instance-0000002a.xml"), STATUS).unwrap();
        let dom = read(&d, "instance-0000002a", 4242).unwrap();
        assert_eq!(dom.uuid.as_deref(), Some("4c2a0001-1b2c-4d3e-8f40-000000000001"));
        let nova = dom.nova.unwrap();
        assert_eq!(nova.name.as_deref(), Some("gpu-train-7"));
        assert_eq!(nova.owner.project.as_deref(), Some("ml-research"));
        assert_eq!(nova.owner.project_id.as_deref(), Some("0a1b2c3d4e5f40718293a4b5c6d7e8f0"));
        assert_eq!(nova.owner.user.as_deref(), Some("alice"));
        assert_eq!(nova.owner.user_id.as_deref(), Some("5f1b2c3d4e5f40718293a4b5c6d7e8f9"));
        assert_eq!(nova.owner.flavor.as_deref(), Some("g1.a100x1"));
        // Another VMM that says `-name guest=instance-0000002a` gets nothing from it.
        assert!(matches!(read(&d, "instance-0000002a", 4243), Err(LibvirtError::NotThisVmm { .. })));
        // A plain libvirt domain: its UUID, no Nova.
        let plain = STATUS.replace(
            &STATUS[STATUS.find("<metadata>").unwrap()..STATUS.find("</metadata>").unwrap() + 11],
            "",
        );
        std::fs::write(d.join("instance-0000002a.xml"), plain).unwrap();
        assert_eq!(read(&d, "instance-0000002a", 4242).unwrap().nova, None);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Whatever the file holds, an error that says what, never a panic, a hang or a forged
    /// identity.
    #[test]
    fn hostile_or_broken_status_files_are_refused() {
        let d = dir("bad");
        for name in ["", ".", "..", "a/b", "x\0y"] {
            assert!(matches!(read(&d, name, 1), Err(LibvirtError::BadName(_))), "{name:?}");
        }
        assert!(matches!(read(&d, "gone", 1), Err(LibvirtError::Missing { .. })));
        let cases = [
            ("notxml", "not xml at all <<<".to_string()),
            ("entity", format!("<!DOCTYPE d [<!ENTITY a 'aaaa'>]>{}", STATUS.replace("alice", "&a;"))),
            ("domain", STATUS.replace("domstatus", "domain")),
            ("other", STATUS.replace("<name>instance-0000002a", "<name>instance-0000002b")),
            ("truncated", STATUS[..STATUS.len() / 2].to_string()),
        ];
        for (tag, text) in cases {
            let name = format!("instance-0000002a-{tag}");
            let text = text.replace("<name>instance-0000002a<", &format!("<name>{name}<"));
            std::fs::write(d.join(format!("{name}.xml")), text).unwrap();
            let r = read(&d, &name, 4242);
            assert!(matches!(r, Err(LibvirtError::Malformed { .. })), "{tag}: {r:?}");
        }
        // Too large.
        let f = std::fs::File::create(d.join("big.xml")).unwrap();
        f.set_len(MAX_BYTES + 1).unwrap();
        assert!(matches!(read(&d, "big", 1), Err(LibvirtError::TooLarge { .. })));
        // A FIFO (a read would never end) and a link: refused at once.
        let fifo = std::ffi::CString::new(d.join("fifo.xml").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(matches!(read(&d, "fifo", 1), Err(LibvirtError::NotAFile { .. })));
        std::os::unix::fs::symlink(d.join("big.xml"), d.join("link.xml")).unwrap();
        assert!(matches!(read(&d, "link", 1), Err(LibvirtError::Read { .. })));
        // Values: cut at 255 bytes on a character boundary, control characters replaced (XML
        // allows only tab and newlines of them; a file with others is malformed).
        let long = format!("a\tb\nc{}", "é".repeat(200));
        let text = STATUS.replace(">gpu-train-7<", &format!(">{long}<"));
        std::fs::write(d.join("instance-0000002a.xml"), text).unwrap();
        let name = read(&d, "instance-0000002a", 4242).unwrap().nova.unwrap().name.unwrap();
        assert!(name.len() <= MAX_VALUE && !name.chars().any(char::is_control), "{name:?}");
        assert!(name.starts_with("a\u{fffd}b\u{fffd}cé") && name.len() == 255, "{name:?}");
        let text = STATUS.replace(">gpu-train-7<", ">a\u{1b}]0;x\u{7}<");
        std::fs::write(d.join("instance-0000002a.xml"), text).unwrap();
        assert!(matches!(read(&d, "instance-0000002a", 4242), Err(LibvirtError::Malformed { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }
}
