//! Ranks as threads of one process on loopback: sums and broadcasts agree, a rank that
//! never comes or leaves makes the others fail within the timeouts, not hang.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use kubetune_collective::{Collective, Config};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn config(rank: usize, world_size: usize, port: u16) -> Config {
    Config {
        rank,
        world_size,
        rendezvous: format!("127.0.0.1:{port}"),
        host: None,
        rendezvous_timeout: Duration::from_secs(3),
        timeout: Duration::from_secs(3),
    }
}

#[test]
fn three_ranks_sum_and_broadcast_the_same_values() {
    let port = free_port();
    let ranks: Vec<_> = (0..3)
        .map(|rank| {
            std::thread::spawn(move || {
                let mut c = Collective::connect(&config(rank, 3, port)).expect("connect");
                // More elements than Gloo's ring segments, so every rank reduces a part.
                let mut grads: Vec<f32> =
                    (0..100_003).map(|i| (i % 7) as f32 + rank as f32).collect();
                c.allreduce_sum_f32(&mut grads).expect("allreduce");
                let mut figures = [rank as f64 + 0.5, 1.0];
                c.allreduce_sum_f64(&mut figures).expect("allreduce f64");
                let mut weights = vec![rank as f32; 5];
                c.broadcast_f32(&mut weights, 0).expect("broadcast");
                c.barrier().expect("barrier");
                (grads, figures, weights)
            })
        })
        .collect();
    for handle in ranks {
        let (grads, figures, weights) = handle.join().expect("rank");
        for (i, g) in grads.iter().enumerate() {
            assert_eq!(*g, 3.0 * (i % 7) as f32 + 3.0, "element {i}");
        }
        assert_eq!(figures, [4.5, 3.0]);
        assert_eq!(weights, vec![0.0; 5]);
    }
}

#[test]
fn a_rank_that_never_joins_fails_the_rendezvous_after_its_timeout() {
    let port = free_port();
    let started = Instant::now();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || Collective::connect(&config(rank, 3, port)).map(|_| ()))
        })
        .collect();
    for handle in ranks {
        let err = handle.join().expect("rank").expect_err("rank 2 never came");
        assert!(err.to_string().contains("rank 2 did not join"), "{err}");
    }
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
}

#[test]
fn without_rank_zero_the_others_give_up_after_the_rendezvous_timeout() {
    let port = free_port();
    let started = Instant::now();
    let err = Collective::connect(&config(1, 2, port)).expect_err("no rank 0");
    assert!(
        err.to_string().contains("did not answer within 3s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[test]
fn a_rank_that_leaves_makes_the_others_fail_their_next_collective_promptly() {
    let port = free_port();
    let ranks: Vec<_> = (0..3)
        .map(|rank| {
            std::thread::spawn(move || {
                let mut c = Collective::connect(&config(rank, 3, port)).expect("connect");
                let mut data = vec![1.0f32; 1000];
                c.allreduce_sum_f32(&mut data).expect("first allreduce");
                if rank == 1 {
                    // Leaving closes its connections, as a dying process' would be.
                    drop(c);
                    return None;
                }
                let started = Instant::now();
                let err = c.allreduce_sum_f32(&mut data).expect_err("rank 1 left");
                Some((started.elapsed(), err.to_string()))
            })
        })
        .collect();
    for handle in ranks {
        if let Some((waited, err)) = handle.join().expect("rank") {
            assert!(
                err.contains("failed to sum gradients across 3 ranks"),
                "{err}"
            );
            assert!(waited < Duration::from_secs(4), "waited {waited:?}: {err}");
            eprintln!("failed after {waited:?}: {err}");
        }
    }
}

/// Runs `body(rank, collective)` on `world_size` connected ranks (threads) and returns
/// what each rank returned, in rank order.
fn on_ranks<T: Send + 'static>(
    world_size: usize,
    body: impl Fn(usize, &mut Collective) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world_size)
        .map(|rank| {
            std::thread::spawn(move || {
                let mut c = Collective::connect(&config(rank, world_size, port)).expect("connect");
                body(rank, &mut c)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank"))
        .collect()
}

#[test]
fn an_all_gather_gives_every_rank_every_shard_in_rank_order() {
    for world_size in [2, 3, 4] {
        let gathered = on_ranks(world_size, |rank, c| {
            let shard: Vec<f32> = (0..1001).map(|i| (rank * 10_000 + i) as f32).collect();
            let mut out = vec![f32::NAN; 1001 * c.world_size()];
            c.allgather_f32(&shard, &mut out).expect("allgather");
            out
        });
        let expected: Vec<f32> = (0..world_size)
            .flat_map(|r| (0..1001).map(move |i| (r * 10_000 + i) as f32))
            .collect();
        for out in gathered {
            assert_eq!(out, expected, "{world_size} ranks");
        }
    }
}

#[test]
fn a_reduce_scatter_leaves_each_rank_its_segment_of_the_sum() {
    for world_size in [2, 3, 4] {
        let n = 20_011;
        let segments = on_ranks(world_size, move |rank, c| {
            // Small integers: every order of summation gives the same f32s.
            let mut data: Vec<f32> = (0..n * c.world_size())
                .map(|i| ((i % 13) + rank) as f32)
                .collect();
            c.reduce_scatter_sum_f32(&mut data)
                .expect("reduce-scatter")
                .to_vec()
        });
        let ranks_sum: usize = (0..world_size).sum();
        for (rank, segment) in segments.into_iter().enumerate() {
            assert_eq!(segment.len(), n);
            for (j, x) in segment.iter().enumerate() {
                let i = rank * n + j;
                let expected = (world_size * (i % 13) + ranks_sum) as f32;
                assert_eq!(*x, expected, "{world_size} ranks, rank {rank}, element {i}");
            }
        }
    }
}

#[test]
fn collectives_refuse_buffers_that_do_not_fit_the_world() {
    let errors = on_ranks(2, |_, c| {
        let mut out = vec![0.0; 3];
        let gather = c
            .allgather_f32(&[1.0, 2.0], &mut out)
            .expect_err("short output");
        let mut odd = vec![0.0; 5];
        let scatter = c
            .reduce_scatter_sum_f32(&mut odd)
            .expect_err("not a multiple");
        (gather.to_string(), scatter.to_string())
    });
    for (gather, scatter) in errors {
        assert!(
            gather.contains("needs 4 elements of output, not 3"),
            "{gather}"
        );
        assert!(
            scatter.contains("a multiple of 2 elements, not 5"),
            "{scatter}"
        );
    }
}
