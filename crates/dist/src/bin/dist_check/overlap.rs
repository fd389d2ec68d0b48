//! Scenarios of [`dist::GradReducer`]: `overlap` (bit-identical to `all_reduce_grads_bucketed` over 10 SGD steps
//! with gradient accumulation, float16 compression against its definition, hook removal on drop) and
//! `overlap-mismatch` (ranks whose losses use different parameters get an error, not a hang).

use dist::{all_reduce_grads_bucketed, DistError, GradCompression, GradReducer, ProcessGroup};
use tch::{Kind, Tensor};

use crate::{ensure, ensure_close, max_abs_diff, pattern, Check};

/// 32 floats per bucket: the network below gets 6 buckets (see `overlap`).
const BUCKET_BYTES: usize = 128;
const LEARNING_RATE: f64 = 0.02;

/// A 3-layer network's parameters: 0 is never used (requires grad, never gets one), 3 is a frozen scale.
fn net_params() -> Vec<Tensor> {
    let param = |shape: &[i64], seed: f64| (pattern(shape, seed, Kind::Float) * 0.5).set_requires_grad(true);
    vec![
        param(&[5], 0.1),
        param(&[16, 8], 0.2),
        param(&[16], 0.3),
        pattern(&[16], 0.4, Kind::Float) + 1.5,
        param(&[8, 16], 0.5),
        param(&[8], 0.6),
        param(&[3, 8], 0.7),
        param(&[3], 0.8),
    ]
}

/// Mean squared error on rank `rank`'s micro-batch `micro` of step `step` (different data per rank).
fn net_loss(p: &[Tensor], rank: usize, step: usize, micro: usize) -> Tensor {
    let seed = 100.0 + 10.0 * rank as f64 + step as f64 + 0.5 * micro as f64;
    let x = pattern(&[4, 8], seed, Kind::Float);
    let target = pattern(&[4, 3], seed + 50.0, Kind::Float);
    let hidden = (x.matmul(&p[1].tr()) + &p[2]).tanh() * &p[3];
    let hidden = (hidden.matmul(&p[4].tr()) + &p[5]).relu();
    (hidden.matmul(&p[6].tr()) + &p[7] - target).square().mean(Kind::Float)
}

fn sgd(params: &[Tensor], learning_rate: f64) {
    tch::no_grad(|| {
        for p in params.iter().filter(|p| p.requires_grad() && p.grad().defined()) {
            let _ = p.shallow_clone().g_sub_(&(p.grad() * learning_rate));
            let _ = p.grad().zero_();
        }
    });
}

fn same_grads(what: &str, got: &[Tensor], expected: &[Tensor]) -> Check {
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let (g, e) = (g.grad(), e.grad());
        ensure(g.defined() == e.defined(), || format!("{what}: parameter {i} has a gradient in one result only"))?;
        ensure(!g.defined() || g.equal(&e), || format!("{what}: parameter {i} differs by {:e}", max_abs_diff(&g, &e)))?;
    }
    Ok(())
}

pub fn overlap(pg: &ProcessGroup) -> Check {
    let err = |e: DistError| e.to_string();
    let rank = pg.rank();
    // Overlapped (a) against today's path (b), each step two accumulated micro-batches; the last step is not
    // armed, so that `finish` reduces everything itself.
    let (a, b) = (net_params(), net_params());
    let reducer = GradReducer::new(pg, &a, BUCKET_BYTES, GradCompression::None).map_err(err)?;
    // Reverse order: [b3 w3] [b2] [w2] [b1] [w1] [unused]; the frozen scale is not planned.
    ensure(reducer.bucket_count() == 6, || format!("expected 6 buckets, got {}", reducer.bucket_count()))?;
    for step in 0..10 {
        let armed = step < 9;
        net_loss(&a, rank, step, 0).backward();
        net_loss(&b, rank, step, 0).backward();
        if armed {
            reducer.arm().map_err(err)?;
        }
        net_loss(&a, rank, step, 1).backward();
        net_loss(&b, rank, step, 1).backward();
        reducer.finish().map_err(err)?;
        all_reduce_grads_bucketed(pg, &b, BUCKET_BYTES).map_err(err)?;
        // All buckets but the unused parameter's last one are launched from the hooks when armed.
        let expected_launches = if armed { 5 } else { 0 };
        ensure(reducer.launched_in_backward() == expected_launches, || {
            format!(
                "step {step}: {} buckets launched in backward, expected {expected_launches}",
                reducer.launched_in_backward()
            )
        })?;
        same_grads(&format!("step {step}"), &a, &b)?;
        let finite =
            a.iter().map(|p| p.grad()).filter(|g| g.defined()).all(|g| g.isfinite().all().int64_value(&[]) == 1);
        ensure(finite, || format!("step {step}: the gradients are not finite; the check would compare NaNs"))?;
        ensure(!a[0].grad().defined() && !a[3].grad().defined(), || "unused and frozen must keep no gradient".into())?;
        sgd(&a, LEARNING_RATE);
        sgd(&b, LEARNING_RATE);
    }
    for (i, (pa, pb)) in a.iter().zip(&b).enumerate() {
        ensure(pa.equal(pb), || format!("parameter {i} after 10 steps differs by {:e}", max_abs_diff(pa, pb)))?;
        for (peer, theirs) in pg.all_gather(pa).map_err(err)?.iter().enumerate() {
            ensure(theirs.equal(pa), || format!("parameter {i} after 10 steps differs from rank {peer}'s"))?;
        }
    }

    // A second reducer over the same parameters is refused on every rank; after a drop the hooks are gone.
    let second = GradReducer::new(pg, &a, BUCKET_BYTES, GradCompression::None);
    ensure(second.as_ref().is_err_and(|e| e.to_string().contains("already has a post-accumulate-grad hook")), || {
        format!("a second reducer over the same parameters should be refused: {second:?}")
    })?;
    reducer.arm().map_err(err)?;
    drop(reducer);
    net_loss(&a, rank, 0, 0).backward();
    fp16(pg, a)
}

/// Float16 compression against its definition, sum over ranks of (local gradient as float16 / world size), and
/// within float16 rounding of today's path.
fn fp16(pg: &ProcessGroup, c: Vec<Tensor>) -> Check {
    let err = |e: DistError| e.to_string();
    let (rank, world) = (pg.rank(), pg.world_size() as f64);
    // The same parameters as the dropped reducer had: a new reducer may hook them again.
    let reducer = GradReducer::new(pg, &c, BUCKET_BYTES, GradCompression::Fp16).map_err(err)?;
    // c was trained above and has gradients from the backward after the drop: start it from d's state.
    let d = net_params();
    tch::no_grad(|| {
        for (pc, pd) in c.iter().zip(&d) {
            pc.shallow_clone().copy_(pd);
            let mut grad = pc.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    });
    net_loss(&c, rank, 3, 0).backward();
    net_loss(&d, rank, 3, 0).backward();
    reducer.arm().map_err(err)?;
    net_loss(&c, rank, 3, 1).backward();
    net_loss(&d, rank, 3, 1).backward();
    reducer.finish().map_err(err)?;
    let local: Vec<Tensor> = d.iter().map(|p| p.grad()).map(|g| if g.defined() { g.copy() } else { g }).collect();
    all_reduce_grads_bucketed(pg, &d, BUCKET_BYTES).map_err(err)?;
    for (i, (pc, pd)) in c.iter().zip(&d).enumerate() {
        if !local[i].defined() {
            ensure(!pc.grad().defined(), || format!("fp16: parameter {i} should have no gradient"))?;
            continue;
        }
        let shares = pg.all_gather(&(local[i].to_kind(Kind::Half) / world)).map_err(err)?;
        let mut sum = shares[0].copy();
        for share in &shares[1..] {
            sum += share;
        }
        let expected = sum.to_kind(Kind::Float);
        ensure(pc.grad().equal(&expected), || {
            format!("fp16: parameter {i} differs from its definition by {:e}", max_abs_diff(&pc.grad(), &expected))
        })?;
        // Each share and the sum are rounded to float16 (relative 2^-11 each): 2^-10 of the largest local value.
        let largest =
            pg.all_gather(&local[i].abs().max()).map_err(err)?.iter().map(|m| m.double_value(&[])).fold(0.0, f64::max);
        ensure_close(&format!("fp16: parameter {i} against float32"), &pc.grad(), &pd.grad(), largest / 1024.0)?;
    }
    Ok(())
}

/// Rank 1's loss skips parameter 1: both ranks get an error naming it, then a consistent step still works.
pub fn mismatch(pg: &ProcessGroup) -> Check {
    let err = |e: DistError| e.to_string();
    let params: Vec<Tensor> = (0..3).map(|i| pattern(&[4, 3], i as f64, Kind::Float).set_requires_grad(true)).collect();
    let reducer = GradReducer::new(pg, &params, 48, GradCompression::None).map_err(err)?;
    reducer.arm().map_err(err)?;
    let skip = if pg.rank() == 1 { Some(1) } else { None };
    params
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, p)| p.square().sum(Kind::Float))
        .sum::<Tensor>()
        .backward();
    let result = reducer.finish();
    let expected = format!("parameter 1 has a gradient on 1 of {} ranks", pg.world_size());
    ensure(
        matches!(&result, Err(DistError::InvalidArgument { rank, op: "GradReducer::finish", reason })
            if *rank == pg.rank() && reason.contains(&expected)),
        || format!("expected an error with `{expected}`, got {result:?}"),
    )?;
    if let Err(e) = &result {
        println!("rank {}: {e}", pg.rank());
    }
    // Every collective was issued on both ranks, so the group is still in step.
    reducer.arm().map_err(err)?;
    params.iter().map(|p| p.sum(Kind::Float)).sum::<Tensor>().backward();
    reducer.finish().map_err(err)
}
