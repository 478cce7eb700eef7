//! Files whose paths a user gives (policy, audit log, `--record`, state, ready file, logs to
//! learn from or replay): opened so that nothing can block on them. A FIFO, a device or a
//! socket put where a file was expected is refused at once (opened non-blocking, then checked
//! with fstat), never waited on: `open(2)` of a FIFO waits for its other end, on the event loop
//! or off it.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

/// Why a user-given path was refused (the caller names the path).
fn not_regular(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{what}, not a regular file"))
}

/// Checks that an open file is a regular file (or, where `devices`, a character device such as
/// /dev/null: writing to one never waits for a peer).
fn checked(file: File, devices: bool) -> io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let t = file.metadata()?.file_type();
    if t.is_file() || (devices && t.is_char_device()) {
        return Ok(file);
    }
    let what = if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a file"
    };
    Err(not_regular(what))
}

/// Opens a regular file for reading; anything else is an error at once.
pub fn open_read(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    checked(file, false)
}

/// Opens (creating) a regular file, or a character device (/dev/null, /dev/full), for
/// appending; a FIFO or a socket is an error at once (a FIFO without a reader fails with ENXIO
/// instead of waiting for one).
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    checked(file, true)
}

/// Writes a whole regular file (created or truncated), refusing anything else at once.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    file = checked(file, false)?;
    file.set_len(0)?;
    file.write_all(bytes)
}

/// Reads a whole regular file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    open_read(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO where a file was expected is refused at once, for reading and for writing (before,
    /// `open(2)` waited for the FIFO's other end).
    #[test]
    fn a_fifo_is_refused_not_waited_on() {
        let dir = std::env::temp_dir().join(format!("ioasid-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let e = open_read(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO, not a regular file"), "{e}");
        assert!(open_append(&fifo).is_err(), "no reader: ENXIO, or refused as a FIFO");
        assert!(write(&fifo, b"x").is_err());
        assert!(read(Path::new("/dev/zero")).unwrap_err().to_string().contains("a device"));
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        let file = dir.join("f");
        write(&file, b"abc").unwrap();
        write(&file, b"d").unwrap();
        assert_eq!(read(&file).unwrap(), b"d");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
