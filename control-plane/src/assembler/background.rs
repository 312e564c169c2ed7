//! A thread of its own, at a lower CPU priority, for working out passes.
//!
//! Ingest is bound by the store's single writer: a batch is acknowledged
//! once the writer has committed it. Working out a pass's trees holds no
//! lock, yet on a busy machine it took cores the writer was waiting for;
//! at a lower priority it runs on what the writer and the gRPC handlers
//! leave. Storing the trees takes the writer, so that stays at normal
//! priority (a low-priority lock holder would stall ingest behind it).
//! Whether assembly keeps up is watched with
//! `custody_assembly_wait_seconds`.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// How much nicer the assembly thread is than the rest of the process: 10
/// gives it about a tenth of a core's time against a busy thread of the
/// process, so it is slowed under load but never starved.
pub(crate) const ASSEMBLY_NICE: i32 = 10;

/// A named thread running one job at a time, at a lower priority.
#[derive(Debug)]
pub(crate) struct Background {
    jobs: mpsc::Sender<Job>,
}

impl Background {
    /// Starts the thread, its nice value `nice` above the process's
    /// (Linux: a thread's nice value is its own). A refusal is logged,
    /// not fatal.
    pub(crate) fn spawn(name: &str, nice: i32) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                lower_priority(nice);
                // Ends once every sender is gone (the server stopped).
                while let Ok(job) = queue.recv() {
                    job();
                }
            })?;
        Ok(Background { jobs })
    }

    /// Runs `f` on the thread and waits for it; `None` if `f` panicked
    /// (the thread goes on with the next job) or the thread is gone.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if let Ok(v) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                let _ = tx.send(v);
            }
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

/// Lowers the calling thread's priority by `by` below the process's
/// (a process started with `nice` keeps its assembly below it too).
fn lower_priority(by: i32) {
    let me = rustix::thread::gettid();
    let lowered = rustix::process::getpriority_process(Some(me))
        .and_then(|now| rustix::process::setpriority_process(Some(me), (now + by).min(19)));
    match lowered {
        Ok(()) => tracing::debug!(by, "assembly thread priority lowered"),
        Err(error) => tracing::warn!(%error, by, "assembly thread priority unchanged"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_a_lower_priority_thread_and_a_panic_fails_only_its_job() {
        let me = rustix::thread::gettid();
        let mine = rustix::process::getpriority_process(Some(me)).unwrap();
        let bg = Background::spawn("custody-test-background", 7).unwrap();
        let (name, nice) = bg
            .run(|| {
                let me = rustix::thread::gettid();
                (
                    std::thread::current().name().map(str::to_owned),
                    rustix::process::getpriority_process(Some(me)).unwrap(),
                )
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("custody-test-background"));
        assert_eq!(nice, (mine + 7).min(19));
        // The caller's own thread keeps its priority.
        assert_eq!(
            rustix::process::getpriority_process(Some(me)).unwrap(),
            mine
        );
        let panicked: Option<()> = bg.run(|| panic!("a failing pass")).await;
        assert_eq!(panicked, None);
        assert_eq!(bg.run(|| 2 + 2).await, Some(4));
    }
}
