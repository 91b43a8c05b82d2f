//! Fixtures shared by the behavioural suites: one scenario, both backends.

use std::sync::Mutex;
use std::time::Duration;

use herdlock::Herd;

use crate::common::server::{self, RedisServer};

/// Which engine a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Memory,
    Redis,
}

/// Builds herds ("nodes") that share one backend and one key prefix.
pub(crate) struct Fx {
    pub(crate) kind: Kind,
    pub(crate) prefix: String,
    first: Mutex<Option<Herd>>,
}

impl Fx {
    pub(crate) fn new(kind: Kind, test: &str) -> Fx {
        Fx {
            kind,
            prefix: server::unique_prefix(test),
            first: Mutex::new(None),
        }
    }

    pub(crate) fn server(&self) -> &'static RedisServer {
        assert_eq!(self.kind, Kind::Redis, "only Redis scenarios have a server");
        server::shared()
    }

    /// A new node with its own owner label, connections and local coalescing.
    pub(crate) async fn node(&self, owner: &str) -> Herd {
        self.node_with(owner, |b| b).await
    }

    pub(crate) async fn node_with(
        &self,
        owner: &str,
        tweak: impl FnOnce(herdlock::Builder) -> herdlock::Builder,
    ) -> Herd {
        let builder = tweak(Herd::builder().prefix(self.prefix.clone()).owner(owner));
        match self.kind {
            Kind::Redis => builder
                .connect(&self.server().url())
                .await
                .expect("connect to the test redis"),
            Kind::Memory => {
                let mut first = self.first.lock().expect("fixture lock");
                if let Some(first) = first.as_ref() {
                    builder.memory_peer(first).expect("memory peer")
                } else {
                    let herd = builder.memory().expect("memory herd");
                    *first = Some(herd.clone());
                    herd
                }
            }
        }
    }
}

impl Fx {
    /// Waits until a waiter is subscribed to every channel of `keys`: on Redis by polling
    /// `PUBSUB NUMSUB` (bounded); the in-memory engine has nothing to observe, so it gives
    /// the waiter a moment. Correctness never depends on this: a release before the waiter
    /// subscribed only makes the waiter's job easier.
    pub(crate) async fn wait_subscribed(&self, keys: &[&str]) {
        if self.kind == Kind::Memory {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for key in keys {
            let channel = format!("{}:{{{key}}}", self.prefix);
            while self.server().subscribers(&channel) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the waiter never subscribed to {channel}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Generates `mod $name { memory, redis }` tests from one async scenario `fn(Fx)`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name(crate::fixture::Fx::new(
                        crate::fixture::Kind::Memory,
                        concat!(module_path!(), "::memory"),
                    ))
                    .await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name(crate::fixture::Fx::new(
                        crate::fixture::Kind::Redis,
                        concat!(module_path!(), "::redis"),
                    ))
                    .await;
                }
            }
        )*
    };
}
pub(crate) use both_backends;

/// Awaits `fut`, failing the test if it takes longer than `limit` (no test may hang).
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(elapsed) => panic!("{what} did not finish within {limit:?} ({elapsed})"),
    }
}
