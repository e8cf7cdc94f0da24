//! The registration server on a thread of its own.
//!
//! A registration is a round trip the sidecar waits for. On the agent's
//! shared runtime each message could wake another worker (on a VM, a
//! cross-CPU wake-up is an IPI and a VM exit) and queue behind span
//! assembly or export. One thread that owns every registration connection
//! serves ready connections back to back; the table lock is the only point
//! it shares with the rest of the agent. /proc walks still go to the
//! blocking pool (`Registry::processes`).
use std::{sync::Arc, thread::JoinHandle};

use tokio::{net::UnixListener, sync::oneshot};

use super::{Registry, RegistryError};

/// The serving thread; dropping this stops it and waits for it.
pub struct Serving {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Registry {
    /// Serves `listener` on a new thread until the returned guard drops.
    pub fn serve_on_own_thread(
        self: Arc<Self>,
        listener: UnixListener,
    ) -> Result<Serving, RegistryError> {
        // A tokio listener belongs to the runtime it was made in: hand the
        // socket over as a std one.
        let std = listener.into_std().map_err(RegistryError::Thread)?;
        let (stop, stopped) = oneshot::channel::<()>();
        // The thread says whether it could serve before the agent goes on:
        // an agent that cannot take registrations fails at start.
        let (ready, started) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("tagflow-registry".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match UnixListener::from_std(std) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    tokio::select! {
                        _ = self.serve(listener) => {}
                        _ = stopped => {}
                    }
                });
                // Open connections go with the runtime, as they went with
                // the agent's: what they held is left to the tables' idle
                // expiry (or to the next agent, when the maps are pinned).
            })
            .map_err(RegistryError::Thread)?;
        let serving = Serving {
            stop: Some(stop),
            thread: Some(thread),
        };
        match started.recv() {
            Ok(Ok(())) => Ok(serving),
            Ok(Err(e)) => Err(RegistryError::Thread(e)),
            Err(_) => Err(RegistryError::Thread(std::io::Error::other(
                "the registration thread ended before serving",
            ))),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
