//! `bench-overlap`: milliseconds per training step (forward, backward, gradient averaging) of a stack of wide
//! 3x3 convolutions, with no communication, with today's `all_reduce_grads_bucketed` after backward, and with the
//! overlapped `GradReducer`; printed on rank 0. Steps of the three kinds alternate, so that load from other
//! processes falls on all of them alike. Each rank computes on one thread (as one process per core would).

use std::time::{Duration, Instant};

use dist::{all_reduce_grads_bucketed, DistError, GradCompression, GradReducer, ProcessGroup};
use tch::{Device, Kind, Tensor};

use crate::{ensure, max_abs_diff, pattern, Check};

/// DDP's default bucket size.
const BUCKET_BYTES: usize = 25 << 20;
const LAYERS: i64 = 6;
const CHANNELS: i64 = 512;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Local,
    AfterBackward,
    Overlapped,
}

fn conv_params() -> Vec<Tensor> {
    let fan_in = (CHANNELS * 9) as f64;
    (0..LAYERS)
        .flat_map(|layer| {
            let weight = pattern(&[CHANNELS, CHANNELS, 3, 3], layer as f64, Kind::Float) / fan_in.sqrt();
            let bias = Tensor::zeros([CHANNELS], (Kind::Float, Device::Cpu));
            [weight.set_requires_grad(true), bias.set_requires_grad(true)]
        })
        .collect()
}

fn loss(params: &[Tensor], rank: usize, step: usize) -> Tensor {
    let mut x = pattern(&[4, CHANNELS, 8, 8], 10.0 * rank as f64 + step as f64, Kind::Float);
    for layer in params.chunks(2) {
        x = x.conv2d(&layer[0], Some(&layer[1]), [1, 1], [1, 1], [1, 1], 1).relu();
    }
    x.square().mean(Kind::Float)
}

pub fn bench_overlap(pg: &ProcessGroup, steps: usize) -> Check {
    let err = |e: DistError| e.to_string();
    tch::set_num_threads(1);
    let params = conv_params();
    let reducer = GradReducer::new(pg, &params, BUCKET_BYTES, GradCompression::None).map_err(err)?;
    let paths = [Path::Local, Path::AfterBackward, Path::Overlapped];
    let mut totals = [Duration::ZERO; 3];
    // Time from the end of backward to the end of the step (the communication not hidden behind backward).
    let mut tails = [Duration::ZERO; 3];
    let mut launched = 0;
    // Step 0 warms up (allocations, Gloo connections) and is not counted.
    for step in 0..=steps {
        for (p, &path) in paths.iter().enumerate() {
            tch::no_grad(|| {
                for param in &params {
                    let mut grad = param.grad();
                    if grad.defined() {
                        let _ = grad.zero_();
                    }
                }
            });
            pg.barrier().map_err(err)?;
            let start = Instant::now();
            let loss = loss(&params, pg.rank(), step);
            if path == Path::Overlapped {
                reducer.arm().map_err(err)?;
            }
            loss.backward();
            let backward_done = Instant::now();
            match path {
                Path::Local => {}
                Path::AfterBackward => {
                    all_reduce_grads_bucketed(pg, &params, BUCKET_BYTES).map_err(err)?;
                }
                Path::Overlapped => {
                    reducer.finish().map_err(err)?;
                    launched = reducer.launched_in_backward();
                }
            }
            if step > 0 {
                totals[p] += start.elapsed();
                tails[p] += backward_done.elapsed();
            }
        }
    }
    // The last step's overlapped gradients against today's path on the same weights and data.
    let overlapped: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
    tch::no_grad(|| params.iter().for_each(|p| drop(p.grad().zero_())));
    loss(&params, pg.rank(), steps).backward();
    all_reduce_grads_bucketed(pg, &params, BUCKET_BYTES).map_err(err)?;
    for (i, (p, o)) in params.iter().zip(&overlapped).enumerate() {
        ensure(p.grad().equal(o), || {
            format!("parameter {i}: the two paths differ by {:e}", max_abs_diff(&p.grad(), o))
        })?;
    }
    if pg.rank() == 0 {
        let ms = |total: Duration| total.as_secs_f64() * 1000.0 / steps as f64;
        let megabytes = params.iter().map(|p| p.numel() * 4).sum::<usize>() as f64 / 1e6;
        println!(
            "bench-overlap: {LAYERS} convs 3x3 {CHANNELS}->{CHANNELS} on 4x{CHANNELS}x8x8, {megabytes:.1} MB of \
             gradients in {} buckets of <= 25 MiB, {} ranks (gloo), {steps} steps, 1 thread per rank",
            reducer.bucket_count(),
            pg.world_size()
        );
        println!("  forward+backward, no communication: {:.1} ms/step", ms(totals[0]));
        println!(
            "  + all_reduce_grads_bucketed after backward: {:.1} ms/step ({:.1} ms after backward)",
            ms(totals[1]),
            ms(tails[1])
        );
        println!(
            "  + GradReducer overlapped with backward: {:.1} ms/step ({:.1} ms after backward; {launched} of {} \
             buckets launched in backward)",
            ms(totals[2]),
            ms(tails[2]),
            reducer.bucket_count()
        );
    }
    Ok(())
}
