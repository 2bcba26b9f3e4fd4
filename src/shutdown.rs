//! Shutdown signalling: SIGINT and SIGTERM (systemd stops services with SIGTERM) turned into a
//! future, which [`crate::relay::run`] takes as its trigger so tests can pass their own.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

/// Installs the process' SIGINT/SIGTERM handler and returns a future that resolves on the first
/// signal. A second signal exits the process at once, for an operator who does not want to wait
/// out the grace period.
///
/// # Errors
///
/// When a handler is already installed (this can only be called once per process).
pub fn signal() -> Result<impl Future<Output = ()> + Send + 'static, ctrlc::Error> {
    let (tx, mut rx) = watch::channel(false);
    let received = AtomicUsize::new(0);
    // ctrlc runs this on its own thread, not in a signal handler, so it may print and exit.
    ctrlc::set_handler(move || {
        if received.fetch_add(1, Ordering::SeqCst) == 0 {
            tx.send_replace(true);
        } else {
            eprintln!("dedupd: second signal, exiting without finishing in-flight work");
            std::process::exit(130);
        }
    })?;
    Ok(async move {
        // An error means the sender is gone, which only happens at process exit.
        let _ = rx.wait_for(|fired| *fired).await;
    })
}

/// A shutdown trigger shared by the relay's tasks: fired once, observed by many.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The firing side of [`Shutdown`].
#[derive(Debug)]
pub(crate) struct Trigger {
    tx: watch::Sender<bool>,
}

impl Trigger {
    /// A trigger and the first observer.
    pub(crate) fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger { tx }, Shutdown { rx })
    }

    /// Tells every observer to stop.
    pub(crate) fn fire(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown is asked for (at once if it already was).
    pub(crate) async fn fired(&mut self) {
        // A dropped trigger counts as fired: nobody is left to keep us running.
        let _ = self.rx.wait_for(|fired| *fired).await;
    }
}
