//! Supervisor benches on the in-memory backends: time from an injected failure to
//! the supervisor's recovery for one service, and the time per reconcile event with
//! 1,000 and 10,000 services (a failure injected into one service among them, and a
//! reconcile of a healthy one).

use std::time::{Duration, Instant};

use br2k_benches::supervisor::Fleet;
use criterion::{BenchmarkId, Criterion, criterion_main};

const TIMEOUT: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn failure_to_recovered(c: &mut Criterion) {
    let rt = runtime();
    let fleet = rt
        .block_on(Fleet::start(1, Duration::from_secs(5), TIMEOUT))
        .expect("fleet");
    let id = fleet.ids[0].clone();
    let mut g = c.benchmark_group("supervisor");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.bench_function("failure_to_recovered/1_service", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += fleet
                        .break_and_recover(&id, TIMEOUT)
                        .await
                        .expect("recovered");
                }
                total
            })
        })
    });
    g.finish();
    drop(fleet);
}

fn per_event(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("supervisor");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for n in [1_000usize, 10_000] {
        let fleet = rt
            .block_on(Fleet::start(n, Duration::from_secs(5), TIMEOUT))
            .expect("fleet");
        let mut next = 0usize;
        g.bench_with_input(
            BenchmarkId::new("failure_event_to_recovered", n),
            &n,
            |b, &n| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            next = (next + 7919) % n;
                            total += fleet
                                .break_and_recover(&fleet.ids[next], TIMEOUT)
                                .await
                                .expect("recovered");
                        }
                        total
                    })
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("healthy_reconcile", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        next = (next + 7919) % n;
                        fleet
                            .supervisor
                            .reconcile(&fleet.ids[next])
                            .await
                            .expect("reconcile");
                    }
                    start.elapsed()
                })
            })
        });
        drop(fleet);
    }
    g.finish();
}

mod group {
    //! criterion's generated group function has no doc comment.
    #![allow(missing_docs)]
    use super::{failure_to_recovered, per_event};
    use criterion::criterion_group;
    criterion_group!(benches, failure_to_recovered, per_event);
}
criterion_main!(group::benches);
