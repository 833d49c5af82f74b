//! Client CPU time per invocation: batches of invocations run one after another
//! on a current-thread runtime, on this thread, and the CPU time this thread
//! used (`getrusage(RUSAGE_THREAD)`: user and system) is divided by the batch's
//! size.
//!
//! On a current-thread runtime everything the invocation does runs on the
//! thread that blocks on it: the handler, the wrapper, the client's encoding,
//! signing and parsing, the connection's driver task and the I/O driver's
//! system calls, and nothing else does (criterion's timings run elsewhere, on a
//! multi-threaded runtime that idles meanwhile). The process's CPU time
//! (`RUSAGE_SELF`) is printed beside it as a check that no other thread worked
//! for the invocations (a blocking pool, a connection spawned on another
//! runtime). The servers are other processes: their CPU is not counted.
//!
//! The total is the scheduler's count, to the nanosecond; the split between
//! user and system time is the kernel's estimate from where its ticks (4 ms
//! apart at 250 Hz) found the thread, hence batches of at least 0.1 s of CPU.

use std::future::Future;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// User and system CPU time.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    user: Duration,
    system: Duration,
}

impl Usage {
    fn total(self) -> Duration {
        self.user + self.system
    }

    fn since(self, earlier: Usage) -> Usage {
        Usage {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

fn getrusage(who: libc::c_int) -> Usage {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage`; getrusage only writes it.
    let usage = unsafe {
        assert_eq!(libc::getrusage(who, usage.as_mut_ptr()), 0, "getrusage");
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Usage {
        user: time(usage.ru_utime),
        system: time(usage.ru_stime),
    }
}

#[cfg(target_os = "linux")]
fn thread_usage() -> Usage {
    getrusage(libc::RUSAGE_THREAD)
}

/// Elsewhere the process's time, with the check meaningless.
#[cfg(not(target_os = "linux"))]
fn thread_usage() -> Usage {
    getrusage(libc::RUSAGE_SELF)
}

fn process_usage() -> Usage {
    getrusage(libc::RUSAGE_SELF)
}

/// One batch, per invocation.
#[derive(Clone, Copy, Debug)]
struct Batch {
    thread: Usage,
    process: Duration,
    wall: Duration,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Invocations per batch, given a first one's figures: enough for 0.4 s of
/// wall time and 0.1 s of CPU time (the user and system split is sampled at
/// the kernel's ticks, a few milliseconds apart), but no more than 2 s of wall
/// time.
fn batch_size(warm: Batch) -> usize {
    let fit = |budget: f64, per: Duration| (budget / per.as_secs_f64().max(1e-8)) as usize;
    let wanted = fit(0.4, warm.wall).max(fit(0.1, warm.thread.total()));
    wanted.min(fit(2.0, warm.wall)).clamp(20, 200_000)
}

/// Runs `invoke` on events from `event`, on `runtime` (current-thread), and
/// prints the client CPU time per invocation as `cpu/{name}`: the median of 5
/// batches sized to take about 0.4 s each when benchmarking; one invocation
/// after one warm-up when `cargo test` runs the benches once.
pub fn measure<E, Fut>(
    runtime: &Runtime,
    name: &str,
    benchmarking: bool,
    mut event: impl FnMut() -> E,
    mut invoke: impl FnMut(E) -> Fut,
) where
    Fut: Future<Output = bool>,
{
    let mut batch = |size: usize| {
        // The events are made before the clock starts.
        let events: Vec<E> = (0..size).map(|_| event()).collect();
        let (thread, process, wall) = (thread_usage(), process_usage(), Instant::now());
        let all_ok = runtime.block_on(async {
            let mut all_ok = true;
            for event in events {
                all_ok &= invoke(event).await;
            }
            all_ok
        });
        let (wall, process, thread) = (
            wall.elapsed(),
            process_usage().since(process),
            thread_usage().since(thread),
        );
        assert!(all_ok, "cpu/{name}: an invocation failed");
        let per = |d: Duration| d / size as u32;
        Batch {
            thread: Usage {
                user: per(thread.user),
                system: per(thread.system),
            },
            process: per(process.total()),
            wall: per(wall),
        }
    };
    // Warm-up: connections open, scripts loaded, the local cache filled.
    let warm = batch(if benchmarking { 20 } else { 1 });
    let (size, batches) = if benchmarking {
        (batch_size(warm), 5)
    } else {
        (1, 1)
    };
    let mut measured: Vec<Batch> = (0..batches).map(|_| batch(size)).collect();
    measured.sort_by_key(|b| b.thread.total());
    let median = measured[measured.len() / 2];
    println!(
        "cpu/{name:<50} {:>9.1} µs per invocation (user {:.1}, system {:.1}; process {:.1}; wall {:.1} µs) median of {batches} batches of {size} ({:.1} to {:.1})",
        us(median.thread.total()),
        us(median.thread.user),
        us(median.thread.system),
        us(median.process),
        us(median.wall),
        us(measured[0].thread.total()),
        us(measured[measured.len() - 1].thread.total()),
    );
}
