//! Patch-feature aggregation as fixed-weight convolutions.
//!
//! The method takes each position's 3x3 neighbourhood (channel-major, index c*9+k),
//! adaptive-average-pools it to D_pre values per stage, concatenates the two stages and
//! pools again to D. All of that is linear in the backbone features, so it equals one
//! 3x3 convolution per stage whose weights are the composed pooling matrices. Bilinear
//! resizing (stage B, 18 -> 36) is linear over space and commutes with that channel
//! mixing, so stage B is pooled first and resized after. Because pooling bins cover
//! runs of consecutive channels, the convolution is grouped: with the paper's sizes each
//! output reads 1 or 2 input channels, which avoids the 48 MB unfold tensor per image.

/// Sparse rows of an adaptive 1-D average pooling from `len` inputs to `n` outputs
/// (PyTorch `adaptive_avg_pool1d`): bin j averages floor(j*L/n) .. ceil((j+1)*L/n)-1.
pub fn adaptive_pool_rows(len: usize, n: usize) -> Vec<Vec<(usize, f64)>> {
    (0..n)
        .map(|j| {
            let start = j * len / n;
            let end = ((j + 1) * len).div_ceil(n);
            let w = 1.0 / (end - start) as f64;
            (start..end).map(|i| (i, w)).collect()
        })
        .collect()
}

/// One stage's share of the aggregation: a grouped 3x3 convolution.
#[derive(Debug, Clone)]
pub struct StageConv {
    /// Output rows of the final embedding this conv produces, in order.
    pub rows: Vec<usize>,
    /// Weight [out, in_per_group, 3, 3].
    pub weight: Vec<f32>,
    pub shape: [usize; 4],
    pub groups: usize,
}

/// How the two stage convolutions combine into the D-wide embedding.
#[derive(Debug, Clone)]
pub struct Aggregation {
    pub stage_a: StageConv,
    pub stage_b: StageConv,
    /// Stage A produces rows 0..k and stage B rows k..D: concatenate. Otherwise both
    /// produce all D rows and are added.
    pub concat: bool,
    pub embed_dim: usize,
}

/// Composes the pooling matrices for stages with `ca` and `cb` channels.
pub fn plan(ca: usize, cb: usize, pre_dim: usize, embed_dim: usize) -> Aggregation {
    let pa = adaptive_pool_rows(ca * 9, pre_dim);
    let pb = adaptive_pool_rows(cb * 9, pre_dim);
    let fuse = adaptive_pool_rows(2 * pre_dim, embed_dim);
    // Dense rows of the composed maps, stage input index c*9+k.
    let mut ma = vec![vec![0f64; ca * 9]; embed_dim];
    let mut mb = vec![vec![0f64; cb * 9]; embed_dim];
    for (j, row) in fuse.iter().enumerate() {
        for &(k, wf) in row {
            if k < pre_dim {
                for &(i, wp) in &pa[k] {
                    ma[j][i] += wf * wp;
                }
            } else {
                for &(i, wp) in &pb[k - pre_dim] {
                    mb[j][i] += wf * wp;
                }
            }
        }
    }
    let nz = |m: &Vec<Vec<f64>>| -> Vec<usize> {
        (0..embed_dim)
            .filter(|&j| m[j].iter().any(|v| *v != 0.0))
            .collect()
    };
    let (ra, rb) = (nz(&ma), nz(&mb));
    let k = ra.len();
    let concat = ra == (0..k).collect::<Vec<_>>() && rb == (k..embed_dim).collect::<Vec<_>>();
    let (ra, rb) = if concat {
        (ra, rb)
    } else {
        ((0..embed_dim).collect(), (0..embed_dim).collect())
    };
    Aggregation {
        stage_a: grouped_conv(&ma, &ra, ca),
        stage_b: grouped_conv(&mb, &rb, cb),
        concat,
        embed_dim,
    }
}

/// Finds the smallest channel group size g such that the selected rows split into
/// C/g equal blocks each reading only its own g channels, and writes the conv weight.
fn grouped_conv(m: &[Vec<f64>], rows: &[usize], channels: usize) -> StageConv {
    let r = rows.len();
    let reads_within = |g: usize| -> bool {
        let groups = channels / g;
        if !r.is_multiple_of(groups) {
            return false;
        }
        let per = r / groups;
        rows.iter().enumerate().all(|(o, &row)| {
            let grp = o / per;
            let (lo, hi) = (grp * g * 9, (grp + 1) * g * 9);
            m[row]
                .iter()
                .enumerate()
                .all(|(i, v)| *v == 0.0 || (lo..hi).contains(&i))
        })
    };
    let g = (1..=channels)
        .filter(|g| channels.is_multiple_of(*g))
        .find(|&g| reads_within(g))
        .unwrap_or(channels);
    let groups = channels / g;
    let per = r / groups;
    let mut weight = vec![0f32; r * g * 9];
    for (o, &row) in rows.iter().enumerate() {
        let grp = o / per;
        for ci in 0..g {
            for k in 0..9 {
                weight[(o * g + ci) * 9 + k] = m[row][(grp * g + ci) * 9 + k] as f32;
            }
        }
    }
    StageConv {
        rows: rows.to_vec(),
        weight,
        shape: [r, g, 3, 3],
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_pool_matches_pytorch_bins() {
        // 4608 -> 1536: groups of 3; 9216 -> 1536: groups of 6.
        let r = adaptive_pool_rows(4608, 1536);
        assert_eq!(
            r[5].iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![15, 16, 17]
        );
        let r = adaptive_pool_rows(9216, 1536);
        assert_eq!(r[1].len(), 6);
        // 360 -> 384 up-samples: bins of 1 or 2 that overlap.
        let r = adaptive_pool_rows(360, 384);
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0]);
        assert_eq!(r[1].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(r[15].iter().map(|x| x.0).collect::<Vec<_>>(), vec![14]);
    }

    #[test]
    fn paper_sizes_give_small_integer_groups() {
        let a = plan(512, 1024, 1536, 1536);
        assert!(a.concat);
        // stage A: 768 outputs, each the mean of 6 unfold values over 2 channels.
        assert_eq!(a.stage_a.shape, [768, 2, 3, 3]);
        assert_eq!(a.stage_a.groups, 256);
        // stage B: 768 outputs, each the mean of 12 values; 3 outputs per 4 channels.
        assert_eq!(a.stage_b.shape, [768, 4, 3, 3]);
        assert_eq!(a.stage_b.groups, 256);
        let lite = plan(40, 112, 384, 384);
        assert!(lite.concat);
        assert_eq!(lite.stage_a.groups, 8);
        assert_eq!(lite.stage_b.groups, 16);
    }

    #[test]
    fn grouped_weights_reproduce_the_dense_composition() {
        // Compare conv weights against a direct evaluation of pool(unfold) then fuse.
        let (ca, cb, pre, d) = (4, 6, 12, 10);
        let agg = plan(ca, cb, pre, d);
        let pa = adaptive_pool_rows(ca * 9, pre);
        let fuse = adaptive_pool_rows(2 * pre, d);
        // Embedding row j's weight on stage-A input index i, from the definition.
        for (o, &row) in agg.stage_a.rows.iter().enumerate() {
            let [_, g, _, _] = agg.stage_a.shape;
            let per = agg.stage_a.rows.len() / agg.stage_a.groups;
            for i in 0..ca * 9 {
                let mut want = 0.0;
                for &(k, wf) in &fuse[row] {
                    if k < pre {
                        want += pa[k]
                            .iter()
                            .filter(|x| x.0 == i)
                            .map(|x| x.1 * wf)
                            .sum::<f64>();
                    }
                }
                let (c, kk) = (i / 9, i % 9);
                let grp = o / per;
                let got = if c / g == grp {
                    agg.stage_a.weight[(o * g + c % g) * 9 + kk] as f64
                } else {
                    0.0
                };
                assert!(
                    (got - want).abs() < 1e-7,
                    "row {row} input {i}: {got} vs {want}"
                );
            }
        }
    }
}
