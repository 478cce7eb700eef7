//! `ioasid-agent policy check PATH`.

use std::path::Path;

use anyhow::Result;

use crate::engine::policy::Policy;

pub fn check(path: &Path) -> Result<()> {
    let p = Policy::load(path)?;
    println!(
        "{}: valid: {} rule(s), default incoherent_dma: {:?}",
        path.display(),
        p.rule_count(),
        p.default
    );
    for note in p.notes() {
        println!("note: {note}");
    }
    Ok(())
}
