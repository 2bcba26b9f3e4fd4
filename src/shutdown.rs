//! The process' one shutdown signal: SIGINT or SIGTERM (systemd stops services with SIGTERM),
//! caught by `ctrlc`, cancels a [`CancellationToken`]; every task watches a [`Shutdown`] made from
//! it.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

/// Installs the process' SIGINT/SIGTERM handler and returns the token the first signal cancels.
/// A second signal exits the process at once, for an operator who does not want to wait out the
/// grace period.
///
/// # Errors
///
/// When a handler is already installed (this can only be called once per process).
pub fn on_signal() -> Result<CancellationToken, ctrlc::Error> {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let received = AtomicUsize::new(0);
    // ctrlc runs this on its own thread, not in a signal handler, so it may print and exit.
    ctrlc::set_handler(move || {
        if received.fetch_add(1, Ordering::SeqCst) == 0 {
            cancel.cancel();
        } else {
            eprintln!("dedupd: second signal, exiting without finishing in-flight work");
            std::process::exit(130);
        }
    })?;
    Ok(token)
}

/// A task's view of the service's token: it can wait for shutdown but not ask for it, so only
/// the service decides when the process stops.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown(CancellationToken);

impl Shutdown {
    /// Watches `token`.
    pub(crate) fn new(token: &CancellationToken) -> Shutdown {
        Shutdown(token.clone())
    }

    /// Resolves once shutdown is asked for (at once if it already was).
    pub(crate) async fn fired(&mut self) {
        self.0.cancelled().await;
    }
}
