//! Results that cannot make the round trip through their codec (issue 9): a NaN or an
//! infinity in JSON (written as `null`), a bincode payload that does not decode back. The
//! leader finds out before publishing; every caller, the leader's and the followers', gets
//! the same `Codec` error, and nothing is stored as a success. Both backends.

use std::time::{Duration, Instant};

use herdlock::{ErrorKind, FanoutOptions, Herd, JobError, Push, Role};
use tokio::sync::oneshot;

use crate::fixture::{both_backends, within, Fx, Kind};

both_backends!(
    a_nan_is_one_codec_error_for_every_caller,
    non_finite_values_anywhere_are_refused,
    a_pushed_infinity_is_a_codec_error_for_followers,
);

const WAIT: Duration = Duration::from_secs(10);

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_until_running(herd: &Herd, job: &str) {
    let deadline = Instant::now() + WAIT;
    while herd
        .lock_status(job)
        .await
        .expect("status")
        .holder
        .is_none()
    {
        assert!(Instant::now() < deadline, "the run of {job} never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The stored result's header (`r1:<ok>:`), on Redis.
fn stored_ok_flag(fx: &Fx, job: &str) -> Option<String> {
    (fx.kind == Kind::Redis).then(|| {
        let stored = fx
            .server()
            .cmd(&["GET", &format!("{}:{{{job}}}:result", fx.prefix)]);
        stored.chars().take(5).collect()
    })
}

/// A leader whose job returns NaN, a second caller in its process, a follower in another:
/// all three get the same `Codec` error; the failure is not cached as a success.
async fn a_nan_is_one_codec_error_for_every_caller(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let options = FanoutOptions::new().cache_age(Duration::from_secs(60));
    let must_not_run = || async { Err::<f64, _>(JobError::new("a second run")) };
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let leader = tokio::spawn({
        let (a, options) = (a.clone(), options.clone());
        async move {
            a.fanout_with("nan", WAIT, &options, move || async move {
                let _ = go_rx.await;
                Ok(f64::NAN)
            })
            .await
        }
    });
    wait_until_running(&b, "nan").await;
    let local = tokio::spawn({
        let (a, options) = (a.clone(), options.clone());
        async move { a.fanout_with("nan", WAIT, &options, must_not_run).await }
    });
    let remote = tokio::spawn({
        let (b, options) = (b.clone(), options.clone());
        async move { b.fanout_with("nan", WAIT, &options, must_not_run).await }
    });
    wait_until("the remote caller follows", || b.stats().following == 1).await;
    wait_until("both local callers wait", || a.stats().waiting == 2).await;
    let _ = go_tx.send(());

    let mut messages = Vec::new();
    for (who, task) in [("leader", leader), ("local", local), ("remote", remote)] {
        let e = within(WAIT, who, task)
            .await
            .expect("task")
            .expect_err("a NaN cannot reach the callers");
        assert_eq!(e.kind(), ErrorKind::Codec, "{who}: {e:?}");
        let job = e.job_error().expect("the rejection travels as a job error");
        assert!(job.message().contains("non-finite"), "{who}: {e}");
        messages.push(e.to_string());
    }
    assert!(
        messages.iter().all(|m| *m == messages[0]),
        "callers got different errors: {messages:#?}"
    );
    if let Some(flag) = stored_ok_flag(&fx, "nan") {
        assert_eq!(flag, "r2:0:", "the failure was stored as a success");
    }
    // Not cached as a success: a caller that accepts a cached result runs the job anew.
    let again = a
        .fanout_with("nan", WAIT, &options, || async { Ok(1.5) })
        .await
        .expect("a finite result");
    assert_eq!((again.value, again.role), (1.5, Role::Leader));
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Summary {
    name: String,
    mean: Option<f64>,
    samples: Vec<f32>,
}

/// NaN or infinity anywhere in the value (an `Option`, a `Vec`, a struct field) is refused
/// with JSON; bincode carries the same values faithfully.
async fn non_finite_values_anywhere_are_refused(fx: Fx) {
    let node = fx.node("solo").await;
    let options = FanoutOptions::new();
    let summaries = [
        Summary {
            name: "mean".into(),
            mean: Some(f64::NAN),
            samples: vec![],
        },
        Summary {
            name: "samples".into(),
            mean: None,
            samples: vec![1.0, f32::INFINITY],
        },
    ];
    for (i, summary) in summaries.iter().enumerate() {
        let value = summary.clone();
        let e = node
            .fanout_with(
                &format!("summary-{i}"),
                WAIT,
                &options,
                move || async move { Ok(value) },
            )
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::Codec, "{}: {e:?}", summary.name);
        #[cfg(feature = "bincode")]
        {
            let value = summary.clone();
            let fanned = node
                .fanout_with(
                    &format!("summary-bincode-{i}"),
                    WAIT,
                    &options.clone().codec(herdlock::Codec::Bincode),
                    move || async move { Ok(value) },
                )
                .await
                .expect("bincode carries non-finite floats");
            assert_eq!(fanned.value.name, summary.name);
            assert_eq!(
                fanned.value.mean.map(f64::is_nan),
                summary.mean.map(f64::is_nan)
            );
            assert_eq!(fanned.value.samples.len(), summary.samples.len());
        }
    }
    let e = node
        .fanout("negative-infinity", WAIT, || async {
            Ok(vec![Some(0.5), None, Some(f64::NEG_INFINITY)])
        })
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Codec, "{e:?}");
    // Finite values pass untouched.
    let fine = node
        .fanout("finite", WAIT, || async {
            Ok(vec![Some(0.5), None, Some(f64::MAX)])
        })
        .await
        .expect("finite");
    assert_eq!(fine, vec![Some(0.5), None, Some(f64::MAX)]);
}

/// A pushed run completed with infinity: its followers get the `Codec` error.
async fn a_pushed_infinity_is_a_codec_error_for_followers(fx: Fx) {
    let a = fx.node("a").await;
    let b = fx.node("b").await;
    let options = FanoutOptions::new();
    let Push::Leader(completer) = a.push::<f64>("pushed", WAIT, &options).await.expect("push")
    else {
        panic!("the first caller leads");
    };
    let Push::Follower(follower) = b.push::<f64>("pushed", WAIT, &options).await.expect("push")
    else {
        panic!("the second caller follows");
    };
    let waiting = tokio::spawn(follower.wait());
    wait_until("the follower waits", || b.stats().following == 1).await;
    assert!(completer.complete(Ok(f64::INFINITY)));
    let e = within(WAIT, "the follower", waiting)
        .await
        .expect("task")
        .expect_err("infinity cannot reach the follower");
    assert_eq!(e.kind(), ErrorKind::Codec, "{e:?}");
    assert!(e.to_string().contains("non-finite"), "{e}");
}
