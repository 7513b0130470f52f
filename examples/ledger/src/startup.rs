//! Starting a replica while a dependency is briefly unreachable.

use std::future::Future;
use std::time::{Duration, Instant};

use br2k_core::Result;

/// How long a starting replica retries a dependency that is unavailable (an etcd
/// member restarting, the chain node busy) before it gives up.
pub const START_RETRY: Duration = Duration::from_secs(60);

/// Runs `f` until it succeeds, fails with an error that is not retryable, or `within`
/// has passed (then its last error); pauses 100 ms, doubling up to 2 s, between tries.
pub async fn retry_start<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && start.elapsed() < within => {
                tracing::warn!(what, error = %e, "not available yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use br2k_core::Error;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_what_is_retryable_and_nothing_else() {
        let calls = AtomicU32::new(0);
        let v = retry_start("x", Duration::from_secs(10), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Error::unavailable("down"))
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!((v, calls.load(Ordering::SeqCst)), (7, 3));
        let calls = AtomicU32::new(0);
        let e = retry_start::<(), _, _>("x", Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::not_found("thing"))
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), br2k_core::ErrorKind::NotFound);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let e = retry_start::<(), _, _>("x", Duration::from_millis(50), || async {
            Err(Error::unavailable("down"))
        })
        .await
        .unwrap_err();
        assert!(e.is_retryable());
    }
}
