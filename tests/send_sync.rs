//! Compile-time checks: every public future is `Send` (it can be spawned on a
//! multi-threaded runtime), and every guard, handle and error is `Send + Sync`. Nothing here
//! runs: the test binary does not compile when one of these stops holding.

use std::time::Duration;

use herdlock::{
    Builder, Codec, Completer, Error, ErrorKind, Fanned, FanoutOptions, FencingToken, Follower,
    Herd, HerdStats, Holder, JobError, LockGuard, LockOptions, LockStatus, MultiGuard, Outcome,
    Permit, Push, Semaphore, SemaphoreOptions, SemaphoreStatus, TryLock, TryMulti, TryPermit,
};

fn send<T: Send>(_: &T) {}

const fn send_sync<T: Send + Sync>() {}

// Guards, handles, options, values and errors.
const _: () = {
    send_sync::<Herd>();
    send_sync::<Builder>();
    send_sync::<HerdStats>();
    send_sync::<LockGuard>();
    send_sync::<MultiGuard>();
    send_sync::<Permit>();
    send_sync::<Semaphore>();
    send_sync::<Completer<u32>>();
    send_sync::<Follower<u32>>();
    send_sync::<Push<u32>>();
    send_sync::<TryLock>();
    send_sync::<TryMulti>();
    send_sync::<TryPermit>();
    send_sync::<Outcome<u32>>();
    send_sync::<Fanned<u32>>();
    send_sync::<LockStatus>();
    send_sync::<SemaphoreStatus>();
    send_sync::<Holder>();
    send_sync::<FencingToken>();
    send_sync::<LockOptions>();
    send_sync::<FanoutOptions>();
    send_sync::<SemaphoreOptions>();
    send_sync::<Codec>();
    send_sync::<Error>();
    send_sync::<ErrorKind>();
    send_sync::<JobError>();
};

/// Every public future, built (never awaited) from `Send` inputs, is `Send`.
#[allow(dead_code, clippy::too_many_arguments)]
fn futures_are_send(
    herd: &Herd,
    guard: LockGuard,
    multi: &mut MultiGuard,
    permit: Permit,
    semaphore: &Semaphore,
    follower: Follower<u32>,
) {
    let wait = Duration::from_secs(1);
    let (lock, fan) = (LockOptions::new(), FanoutOptions::new());
    send(&Herd::connect("redis://127.0.0.1/"));
    send(&Herd::builder().connect("redis://127.0.0.1/"));
    send(&herd.try_lock("k"));
    send(&herd.try_lock_with("k", &lock));
    send(&herd.lock("k", wait));
    send(&herd.lock_with("k", wait, &lock));
    send(&herd.lock_status("k"));
    send(&herd.once("k", || async { Ok(1) }));
    send(&herd.once_with("k", &lock, || async { Ok(1) }));
    send(&herd.run_locked("k", wait, || async { Ok(1) }));
    send(&herd.run_locked_with("k", wait, &lock, || async { Ok(1) }));
    send(&herd.try_multi(&["a", "b"]));
    send(&herd.try_multi_with(&["a", "b"], &lock));
    send(&herd.multi(&["a", "b"], wait));
    send(&herd.multi_with(&["a", "b"], wait, &lock));
    send(&herd.fanout("j", wait, || async { Ok(1) }));
    send(&herd.fanout_with("j", wait, &fan, || async { Ok(1) }));
    send(&herd.push::<u32>("j", wait, &fan));
    send(&semaphore.try_acquire());
    send(&semaphore.acquire(wait));
    send(&semaphore.status());
    send(&guard.extend(wait));
    send(&guard.heartbeat());
    send(&guard.lost());
    send(&multi.extend(wait));
    send(&multi.lost());
    send(&permit.extend(wait));
    send(&permit.lost());
    send(&follower.wait());
    send(&guard.release());
    send(&permit.release());
}
