//! Data-parallel helpers: start every rank from rank 0's parameters, and average gradients after backward in
//! size-bounded buckets (flatten, one all-reduce per bucket, unflatten), as PyTorch's DDP does.

use tch::{Device, Kind, Tensor};

use crate::{DistError, ProcessGroup, ReduceOp};

/// Overwrites every tensor (parameters, and buffers such as BatchNorm statistics) with rank `root`'s values, so
/// that all ranks start from identical weights.
pub fn broadcast_parameters(pg: &ProcessGroup, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
    pg.broadcast(tensors, root)
}

/// Replaces the gradient of every parameter by its mean over ranks.
///
/// Parameters without a gradient (frozen, or unused by this step's loss) are skipped; every rank must have
/// gradients for the same parameters, which is checked first so that a mismatch is an error instead of a hang
/// or silently mixed buffers. Gradients are packed in the order given (deterministic on every rank) into
/// buckets of one kind and device holding at most `bucket_bytes` (a larger gradient gets a bucket of its own);
/// all buckets are all-reduced, then copied back. Returns the number of buckets.
pub fn all_reduce_grads_bucketed(
    pg: &ProcessGroup,
    params: &[Tensor],
    bucket_bytes: usize,
) -> Result<usize, DistError> {
    const OP: &str = "all_reduce_grads_bucketed";
    let grads: Vec<(usize, Tensor)> =
        params.iter().enumerate().map(|(i, p)| (i, p.grad())).filter(|(_, g)| g.defined()).collect();
    check_same_grads(pg, OP, params.len(), &grads)?;
    let buckets = plan_buckets(&grads, bucket_bytes);
    let flats: Vec<Tensor> = buckets
        .iter()
        .map(|bucket| Tensor::cat(&bucket.iter().map(|&j| grads[j].1.reshape([-1])).collect::<Vec<_>>(), 0))
        .collect();
    pg.all_reduce(&flats, ReduceOp::Avg)?;
    tch::no_grad(|| {
        for (bucket, flat) in buckets.iter().zip(&flats) {
            let mut offset = 0;
            for &j in bucket {
                let grad = &grads[j].1;
                let numel = grad.numel() as i64;
                grad.detach().copy_(&flat.narrow(0, offset, numel).view_as(grad));
                offset += numel;
            }
        }
    });
    Ok(buckets.len())
}

/// Groups gradient indices (into `grads`) into buckets of one kind and device of at most `bucket_bytes`.
pub(crate) fn plan_buckets(grads: &[(usize, Tensor)], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0usize;
    let mut current_key: Option<(Kind, Device)> = None;
    for (j, (_, grad)) in grads.iter().enumerate() {
        let key = (grad.kind(), grad.device());
        let bytes = grad.numel() * grad.kind().elt_size_in_bytes();
        let fits = current_key == Some(key) && current_bytes + bytes <= bucket_bytes;
        if !current.is_empty() && !fits {
            buckets.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(j);
        current_bytes += bytes;
        current_key = Some(key);
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

/// Verifies that every rank has gradients for the same parameters, comparing a count and an order-sensitive
/// fingerprint of the parameter indices and sizes.
fn check_same_grads(
    pg: &ProcessGroup,
    op: &'static str,
    param_count: usize,
    grads: &[(usize, Tensor)],
) -> Result<(), DistError> {
    let fingerprint = grads.iter().fold(0i64, |acc, (i, g)| {
        acc.wrapping_mul(1_000_003).wrapping_add((*i as i64 + 1).wrapping_mul(31).wrapping_add(g.numel() as i64))
    });
    let record = [param_count as i64, grads.len() as i64, fingerprint];
    if let Some((peer, peer_record)) = first_different_record(pg, op, &record, "gradient summary")? {
        return Err(pg.invalid(
            op,
            format!(
                "this rank has gradients for {} of {} parameters but rank {peer} has {} of {} (or for other \
                 parameters); every rank's loss must use the same parameters",
                record[1], record[0], peer_record[1], peer_record[0]
            ),
        ));
    }
    Ok(())
}

/// Gathers every rank's `record` (a few integers summarising this rank's part in a collective call) and returns
/// the first rank whose record differs from this rank's, with that record; `what` names the record in a read
/// error. How ranks check that they are about to make the same collectives before a mismatch could hang them.
pub(crate) fn first_different_record(
    pg: &ProcessGroup,
    op: &'static str,
    record: &[i64],
    what: &str,
) -> Result<Option<(usize, Vec<i64>)>, DistError> {
    let gathered = pg.gather_same_shape(op, &Tensor::from_slice(record).to_device(pg.device()))?;
    for (peer, peer_record) in gathered.iter().enumerate() {
        let peer_record = Vec::<i64>::try_from(peer_record.to_device(Device::Cpu))
            .map_err(|e| pg.invalid(op, format!("cannot read rank {peer}'s {what}: {e}")))?;
        if peer_record != record {
            return Ok(Some((peer, peer_record)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_size_kind_and_order() {
        let grads: Vec<(usize, Tensor)> = [
            (10, Kind::Float),
            (10, Kind::Float),
            (30, Kind::Float),
            (5, Kind::Double),
            (1, Kind::Float),
            (100, Kind::Float),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(n, kind))| (i, Tensor::zeros([n], (kind, Device::Cpu))))
        .collect();
        // 80 bytes hold 20 floats: [10, 10] fill one bucket, 30 floats overflow alone, the double changes kind.
        assert_eq!(plan_buckets(&grads, 80), vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]);
        assert_eq!(plan_buckets(&grads, 1 << 20), vec![vec![0, 1, 2], vec![3], vec![4, 5]]);
        assert!(plan_buckets(&[], 80).is_empty());
    }
}
