//! Jobs: `Ok(value)` infers, `?` takes every kind of error (std, anyhow, boxed, `String`,
//! `herdlock::Error`, which keeps its kind as the code), and the waiting closure form
//! `run_locked` (ran, timed out, error released, panic released). Both backends.

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use herdlock::{Error, ErrorKind, Herd, JobError, LockOptions, Outcome};

use crate::fixture::{both_backends, within, Fx};

const WAIT: Duration = Duration::from_secs(10);

both_backends!(
    fanout_jobs_take_every_error,
    once_takes_every_error,
    run_locked_runs_after_waiting,
    run_locked_times_out_naming_the_holder,
    run_locked_releases_on_error,
    run_locked_releases_on_panic,
    run_locked_keeps_the_grace_on_success,
);

/// A herdlock error of a known kind: a lock wait that times out (`b` holds `key`).
async fn herd_timeout(herd: &Herd, key: &str) -> Result<(), Error> {
    let _guard = herd.lock(key, Duration::from_millis(20)).await?;
    unreachable!("the lock is held by another node");
}

/// What every caller of a failed fan-out gets: its kind, code and causes.
fn failed<T: std::fmt::Debug>(result: Result<T, Error>) -> (Error, JobError) {
    let err = result.expect_err("the job failed");
    assert_eq!(err.kind(), ErrorKind::JobFailed, "{err}");
    let job = err.job_error().expect("the job's error").clone();
    (err, job)
}

async fn fanout_jobs_take_every_error(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let held = b
        .try_lock("held")
        .await
        .expect("try")
        .acquired()
        .expect("free");

    // A std error through `?`.
    let (err, job) = failed(
        a.fanout("std", WAIT, || async {
            let n: u32 = "not a number".parse()?;
            Ok(n)
        })
        .await,
    );
    assert!(err.to_string().contains("invalid digit"), "{err}");
    assert_eq!(job.code(), None);

    // anyhow, with context: the message is the context, the cause chain travels along.
    let (err, job) = failed(
        a.fanout("anyhow", WAIT, || async {
            Err(anyhow::anyhow!("connection reset")).context("loading the profile")?;
            Ok(())
        })
        .await,
    );
    assert_eq!(job.message(), "loading the profile");
    assert_eq!(job.causes().collect::<Vec<_>>(), ["connection reset"]);
    let text = err.to_string();
    assert!(
        text.contains("loading the profile: connection reset"),
        "{text}"
    );

    // A boxed error, and a plain `String`.
    let (_, job) = failed(
        a.fanout("boxed", WAIT, || async {
            let e: Box<dyn std::error::Error + Send + Sync> = "boxed failure".into();
            Err(e)?;
            Ok(())
        })
        .await,
    );
    assert_eq!(job.message(), "boxed failure");
    let (_, job) = failed(
        a.fanout("string", WAIT, || async {
            Err(String::from("a plain string"))?;
            Ok(())
        })
        .await,
    );
    assert_eq!(job.message(), "a plain string");

    // A herdlock::Error keeps its kind as the code, also under anyhow context, and the
    // follower in another node gets the same.
    let (c, d) = (a.clone(), b.clone());
    let (from_a, from_b) = tokio::join!(
        c.fanout("herd-error", WAIT, {
            let a = a.clone();
            move || async move {
                Box::pin(herd_timeout(&a, "held")).await?;
                Ok(())
            }
        }),
        d.fanout("herd-error", WAIT, {
            let a = a.clone();
            move || async move {
                Box::pin(herd_timeout(&a, "held")).await?;
                Ok(())
            }
        }),
    );
    for result in [from_a, from_b] {
        let (_, job) = failed(result);
        assert_eq!(job.code(), Some("timeout"));
        assert_eq!(job.kind(), Some(ErrorKind::Timeout));
    }
    let (_, job) = failed(
        a.fanout("herd-error-in-context", WAIT, {
            let a = a.clone();
            move || async move {
                Box::pin(herd_timeout(&a, "held"))
                    .await
                    .context("waiting for the import lock")?;
                Ok(())
            }
        })
        .await,
    );
    assert_eq!(job.message(), "waiting for the import lock");
    assert_eq!(job.kind(), Some(ErrorKind::Timeout));

    // Ok infers: the value type comes from the binding.
    let value: Vec<String> = a
        .fanout("ok", WAIT, || async { Ok(vec!["x".to_owned()]) })
        .await
        .expect("ran");
    assert_eq!(value, ["x"]);
    held.release().await.expect("release");
}

#[derive(Debug, PartialEq)]
struct Quota(u32);

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "over quota by {}", self.0)
    }
}

impl std::error::Error for Quota {}

async fn once_takes_every_error(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let held = b
        .try_lock("held")
        .await
        .expect("try")
        .acquired()
        .expect("free");

    // A herdlock::Error from the work comes back unchanged.
    let err = a
        .once("cron", || async {
            Box::pin(herd_timeout(&a, "held")).await?;
            Ok(())
        })
        .await
        .expect_err("timed out inside");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");

    // The caller's own error type comes back as the source of a JobFailed error.
    let err = a
        .once("cron", || async {
            Err(Quota(3))?;
            Ok(())
        })
        .await
        .expect_err("over quota");
    assert_eq!(err.kind(), ErrorKind::JobFailed, "{err}");
    assert_eq!(
        err.source().and_then(|s| s.downcast_ref::<Quota>()),
        Some(&Quota(3))
    );
    assert!(err.to_string().contains("over quota by 3"), "{err}");

    // anyhow and String.
    let err = a
        .once("cron", || async {
            Err(anyhow::anyhow!("broken pipe")).context("uploading")?;
            Ok(())
        })
        .await
        .expect_err("anyhow");
    assert!(err.to_string().contains("uploading: broken pipe"), "{err}");
    let err = a
        .once("cron", || async {
            Err(String::from("nope").into()) as Result<(), _>
        })
        .await
        .expect_err("string");
    assert_eq!(err.job_error().map(JobError::message), Some("nope"));

    // Every failure released the lock at once; Ok infers.
    assert_eq!(
        a.once("cron", || async { Ok(5_u8) }).await.expect("ran"),
        Outcome::Ran(5)
    );
    held.release().await.expect("release");
}

async fn run_locked_runs_after_waiting(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let held = b
        .try_lock("migrations")
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let runs = Arc::new(AtomicUsize::new(0));
    let waiter = tokio::spawn({
        let (a, runs) = (a.clone(), Arc::clone(&runs));
        async move {
            a.run_locked("migrations", WAIT, || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok("migrated")
            })
            .await
        }
    });
    fx.wait_subscribed(&["migrations"]).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "ran while b held the lock");
    held.release().await.expect("release");
    let value = within(WAIT, "the waiter runs", waiter)
        .await
        .expect("task")
        .expect("ran");
    assert_eq!(value, "migrated");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(a
        .lock_status("migrations")
        .await
        .expect("status")
        .holder
        .is_none());
}

async fn run_locked_times_out_naming_the_holder(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("holder-b").await;
    let held = b
        .try_lock("migrations")
        .await
        .expect("try")
        .acquired()
        .expect("free");
    let ran = Arc::new(AtomicUsize::new(0));
    let err = a
        .run_locked("migrations", Duration::from_millis(150), {
            let ran = Arc::clone(&ran);
            || async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .await
        .expect_err("held throughout");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let text = err.to_string();
    assert!(text.contains("holder-b"), "names the holder: {text}");
    assert!(
        text.contains(&held.fence().to_string()),
        "names its fence: {text}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    held.release().await.expect("release");
}

async fn run_locked_releases_on_error(fx: Fx) {
    let a = fx.node("a").await;
    // A grace period applies to success only.
    let options = LockOptions::new().grace(Duration::from_secs(30));
    let err = a
        .run_locked_with("import", WAIT, &options, || async {
            Err(anyhow::anyhow!("disk full"))?;
            Ok(())
        })
        .await
        .expect_err("failed");
    assert_eq!(err.kind(), ErrorKind::JobFailed, "{err}");
    assert!(a
        .lock_status("import")
        .await
        .expect("status")
        .holder
        .is_none());
    assert!(!a.try_lock("import").await.expect("try").is_busy());
}

fn explode() -> u8 {
    panic!("the work panicked (expected by this test)")
}

async fn run_locked_releases_on_panic(fx: Fx) {
    let a = fx.node("a").await;
    let task = tokio::spawn({
        let a = a.clone();
        async move {
            a.run_locked("import", WAIT, || async { Ok(explode()) })
                .await
        }
    });
    let joined = within(WAIT, "the panicking work", task).await;
    assert!(joined.expect_err("panicked").is_panic());
    assert!(a
        .lock_status("import")
        .await
        .expect("status")
        .holder
        .is_none());
}

async fn run_locked_keeps_the_grace_on_success(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let options = LockOptions::new().grace(Duration::from_secs(30));
    let n = a
        .run_locked_with("nightly", WAIT, &options, || async { Ok(1_u64) })
        .await
        .expect("ran");
    assert_eq!(n, 1);
    let holder = b
        .lock_status("nightly")
        .await
        .expect("status")
        .holder
        .expect("kept for the grace period");
    assert_eq!(holder.owner, "a");
}
