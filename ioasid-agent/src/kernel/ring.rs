//! The kernel's ring buffers: events and decisions (decoded, then queued for the actor; event
//! drops counted, decisions never dropped here) and the programs' aya-log records (forwarded
//! into the agent's log).

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{engine::events::Event, kernel::decode, output::telemetry::Metrics};

/// What a reader does with an event when the actor's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Drop it and count it (`ioasid_events_dropped_total`): the events ring.
    DropNewest,
    /// Wait for room, leaving the rest in the kernel's ring: the decisions ring, which nobody
    /// but a holder of a kvm-vfio device can fill.
    Wait,
    /// Fault injection: discard every event, as if the queue were always full.
    DiscardAll,
}

/// Starts a reader: ring buffer -> decode -> bounded queue. An undecodable record is counted
/// and logged (at powers of two), never a panic. Where the queue is full, an event is dropped
/// and counted, but a decision (`lossless`) waits for room: the kernel's ring holds the rest,
/// and the kernel asks rather than allows while that ring runs short.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<Event>,
    metrics: Metrics,
    overflow: Overflow,
    health: std::sync::Arc<crate::output::http::Health>,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always returns that same fd.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        // However the reader ends (an error, a panic), liveness says so.
        struct Stopped(std::sync::Arc<crate::output::http::Health>);
        impl Drop for Stopped {
            fn drop(&mut self) {
                self.0.ring_stopped();
            }
        }
        let _stopped = Stopped(health);
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "ring buffer poll failed; no more events");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match (decode::event(&item), overflow) {
                    (Ok(ev), Overflow::Wait) => {
                        drop(item);
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    (Ok(ev), Overflow::DropNewest) => {
                        if tx.try_send(ev).is_err() {
                            metrics.events_dropped.inc();
                        }
                    }
                    (Ok(_), Overflow::DiscardAll) => metrics.events_dropped.inc(),
                    (Err(e), _) => {
                        let n = metrics.event_decode_errors.get();
                        metrics.event_decode_errors.inc();
                        if crate::util::log_at_powers_of_two(n) {
                            tracing::warn!(error = %e, "undecodable ring buffer record");
                        }
                    }
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Forwards the kernel programs' aya-log records (enforcement actions, signal failures) into
/// the agent's log, under the `ioasid_ebpf` target.
pub fn forward_kernel_log(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "kernel-side log unavailable");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let registered = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered.map_err(|e| e.into_parts().1) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "kernel-side log unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
