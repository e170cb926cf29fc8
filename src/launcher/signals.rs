//! The launcher's own SIGINT/SIGTERM/SIGHUP: noted by a handler, acted on by the supervision loop,
//! which forwards them to every rank.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The last stop signal received and not yet taken (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(signal: libc::c_int) {
    // An atomic store is async-signal-safe.
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// The signals that stop a job; the launcher's exit code is 128 + the signal's number.
pub(crate) const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Installs the handler for [`STOP_SIGNALS`]. Children get the default dispositions back at exec.
pub(crate) fn install() -> nix::Result<()> {
    let action = SigAction::new(SigHandler::Handler(note_signal), SaFlags::SA_RESTART, SigSet::empty());
    for signal in STOP_SIGNALS {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

/// The stop signal received since the last call, if any.
pub(crate) fn take() -> Option<Signal> {
    match RECEIVED.swap(0, Ordering::SeqCst) {
        0 => None,
        number => Signal::try_from(number).ok(),
    }
}
