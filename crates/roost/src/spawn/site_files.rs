//! Looking at a site's own files from the node: its code, its virtualenv, its
//! interpreter. They live wherever the tenant put them, an NFS home or a FUSE mount
//! among them, and a file system that stops answering holds the thread that asked for
//! as long as it stays silent. Every site shares the node's runtime threads, so no look
//! happens there: each runs on a blocking thread, a site's looks run one at a time (a
//! site whose files hang holds one thread, however often it is asked again), and
//! whoever asked waits at most a deadline, then goes on without the answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::{timeout_at, Instant};

/// How long a spawn (or the pool) waits for one look at a site's files.
pub const LOOK_WITHIN: Duration = Duration::from_secs(10);

/// One site's looks at its files.
#[derive(Clone, Default)]
pub struct SiteFiles {
    /// Held by the look under way, on its blocking thread, until its system calls
    /// return: when they never do, the next look finds it held and gives up at its
    /// deadline without taking another thread.
    turn: Arc<Mutex<()>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the site's files did not answer within {} s (a file system that stopped answering?)", .0.as_secs())]
pub struct FilesStalled(pub Duration);

impl SiteFiles {
    /// Runs `look` on a blocking thread once the site's previous look has ended, and
    /// waits for it `within` at most.
    pub async fn look<T, F>(&self, within: Duration, look: F) -> Result<T, FilesStalled>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let deadline = Instant::now() + within;
        let turn = timeout_at(deadline, self.turn.clone().lock_owned())
            .await
            .map_err(|_| FilesStalled(within))?;
        let task = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            look()
        });
        match timeout_at(deadline, task).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the node is stopping, and the answer is not needed.
            Ok(Err(_)) | Err(_) => Err(FilesStalled(within)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "current_thread")]
    async fn a_look_that_hangs_holds_one_thread_and_the_next_looks_give_up() {
        let files = SiteFiles::default();
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(AtomicUsize::new(0));
        let within = Duration::from_millis(200);

        let counted = started.clone();
        let first = files
            .look(within, move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = hung.recv();
            })
            .await;
        assert!(
            first.is_err(),
            "a look that hangs is given up at its deadline"
        );
        // The runtime thread was free meanwhile: this test runs on the only one.
        for _ in 0..3 {
            let counted = started.clone();
            let next = files
                .look(within, move || counted.fetch_add(1, Ordering::SeqCst))
                .await;
            assert!(next.is_err(), "a look waits for the hung one's turn");
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "looks after a hung one must not take threads of their own"
        );

        release.send(()).unwrap();
        let counted = started.clone();
        let after = files
            .look(within, move || counted.fetch_add(1, Ordering::SeqCst) + 1)
            .await;
        assert_eq!(after.unwrap(), 2, "once the hung look returns, looks go on");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn looks_of_different_sites_do_not_wait_for_each_other() {
        let (hung_site, other_site) = (SiteFiles::default(), SiteFiles::default());
        let (_release, hung) = std::sync::mpsc::channel::<()>();
        let stuck = hung_site.look(Duration::from_secs(30), move || {
            let _ = hung.recv();
        });
        tokio::pin!(stuck);
        // Let the hung look take its turn first.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut stuck)
                .await
                .is_err(),
            "the hung look returned"
        );
        let other = other_site.look(Duration::from_secs(5), || "answered").await;
        assert_eq!(other.unwrap(), "answered");
    }
}
