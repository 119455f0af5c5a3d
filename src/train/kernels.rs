//! The few dense kernels the written-out CPU training step is made of: a checked matrix
//! product on the `gemm` crate (the one candle's CPU backend calls), column sums over
//! the rows of a row-major matrix, and row-parallel passes. They work on plain slices
//! that the step reuses from one batch to the next, so that no step allocates,
//! zero-fills or faults in fresh pages (docs/decisions.md, "Training speed").

use candle_core::{Result, bail};
use rayon::prelude::*;

/// Rows per parallel task: large enough to amortise the task, small enough for two
/// cores to share a batch evenly.
const ROWS_PER_TASK: usize = 256;

/// A matrix read from a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View::strided(data, rows, cols, cols)
    }

    /// [rows, cols] whose rows start `row_stride` apart: a column block of a wider matrix.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> View<'a> {
        View {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: 1,
        }
    }

    /// The transpose, without moving data.
    pub fn t(self) -> View<'a> {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside the slice.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst` [a.rows, b.cols], rows `dst_rs` apart, becomes `scale * a b`, added to what
/// it held when `keep`.
pub(super) fn gemm(
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
    keep: bool,
    scale: f32,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || !a.fits() || !b.fits() {
        bail!(
            "matrix product of [{m}, {k}] by [{}, {n}] does not fit its inputs",
            b.rows
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if n > dst_rs || (m - 1) * dst_rs + n > dst.len() {
        bail!("matrix product [{m}, {n}] does not fit its destination");
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the checks above keep every element the two views and the destination
    // describe inside their slices; `dst` is borrowed uniquely, so it overlaps neither
    // input, and the strides are row-major or their transposes (no element written
    // twice).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            keep,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Per column of the row-major `data` ([rows, cols]), K sums in f64: `add(i, row, acc)`
/// adds row i's terms to `acc` ([cols][K]). Blocks of rows are summed in parallel and
/// their sums then added in block order, so the result does not depend on how the
/// threads shared the work (training stays bit-reproducible).
pub(super) fn column_sums<const K: usize>(
    data: &[f32],
    cols: usize,
    add: impl Fn(usize, &[f32], &mut [[f64; K]]) + Sync,
) -> Vec<[f64; K]> {
    let mut total = vec![[0.0; K]; cols];
    if cols == 0 {
        return total;
    }
    let blocks: Vec<Vec<[f64; K]>> = data
        .par_chunks(cols * ROWS_PER_TASK)
        .enumerate()
        .map(|(block, rows)| {
            let mut acc = vec![[0.0; K]; cols];
            for (r, row) in rows.chunks_exact(cols).enumerate() {
                add(block * ROWS_PER_TASK + r, row, &mut acc);
            }
            acc
        })
        .collect();
    for block in &blocks {
        for (x, y) in total.iter_mut().zip(block) {
            for k in 0..K {
                x[k] += y[k];
            }
        }
    }
    total
}

/// The plain per-column totals of the row-major `data` ([rows, cols]), in f64.
pub(super) fn column_totals(data: &[f32], cols: usize) -> Vec<f64> {
    column_sums::<1>(data, cols, |_, row, acc| {
        for (a, v) in acc.iter_mut().zip(row) {
            a[0] += *v as f64;
        }
    })
    .iter()
    .map(|s| s[0])
    .collect()
}

/// `f(i, row)` on every row of the row-major `data` ([rows, cols]), rows in parallel.
pub(super) fn for_rows(data: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if cols == 0 {
        return;
    }
    data.par_chunks_mut(cols * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(block, rows)| {
            for (r, row) in rows.chunks_exact_mut(cols).enumerate() {
                f(block * ROWS_PER_TASK + r, row);
            }
        });
}

/// `f(i, row_a, row_b)` on the rows of two row-major matrices with as many rows.
pub(super) fn for_row_pairs(
    a: &mut [f32],
    a_cols: usize,
    b: &mut [f32],
    b_cols: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    if a_cols == 0 || b_cols == 0 {
        return;
    }
    a.par_chunks_mut(a_cols * ROWS_PER_TASK)
        .zip(b.par_chunks_mut(b_cols * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(block, (ra, rb))| {
            for (r, (x, y)) in ra
                .chunks_exact_mut(a_cols)
                .zip(rb.chunks_exact_mut(b_cols))
                .enumerate()
            {
                f(block * ROWS_PER_TASK + r, x, y);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop, in f64.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    #[test]
    fn products_of_views_and_transposes_match_the_triple_loop() {
        let (m, k, n) = (37, 19, 23);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let want = reference(&a, &b, m, k, n);
        let mut out = vec![0.0f32; m * n];
        gemm(
            &mut out,
            n,
            View::new(&a, m, k),
            View::new(&b, k, n),
            false,
            1.0,
        )
        .unwrap();
        for (x, y) in out.iter().zip(&want) {
            assert!((*x as f64 - y).abs() < 1e-4, "{x} vs {y}");
        }
        // The same product from transposed storage, scaled by -2 and added to 1s,
        // written into the right half of a wider destination.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut wide = vec![1.0f32; m * 2 * n];
        gemm(
            &mut wide[n..],
            2 * n,
            View::new(&at, k, m).t(),
            View::new(&bt, n, k).t(),
            true,
            -2.0,
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                assert_eq!(wide[i * 2 * n + j], 1.0);
                let got = wide[i * 2 * n + n + j] as f64;
                assert!((got - (1.0 - 2.0 * want[i * n + j])).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn a_product_that_does_not_fit_is_an_error_not_a_write_out_of_bounds() {
        let a = values(6, 3);
        let mut out = vec![0.0f32; 4];
        let refused = |out: &mut [f32], lhs: (usize, usize)| {
            gemm(
                out,
                2,
                View::new(&a, lhs.0, lhs.1),
                View::new(&a, 2, 2),
                false,
                1.0,
            )
            .is_err()
        };
        // [2, 3] x [2, 2]: inner sizes differ.
        assert!(refused(&mut out, (2, 3)));
        // [3, 2] x [2, 2] is [3, 2], which 4 elements cannot hold.
        assert!(refused(&mut out, (3, 2)));
        // A view larger than its slice.
        assert!(refused(&mut out, (4, 2)));
        // [2, 2] x [2, 2] fits.
        assert!(!refused(&mut out, (2, 2)));
    }

    #[test]
    fn column_sums_and_row_passes_cover_every_row_once() {
        let cols = 3;
        let rows = 2 * ROWS_PER_TASK + 7;
        let mut data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let sums = column_sums::<2>(&data, cols, |i, row, acc| {
            for (j, v) in row.iter().enumerate() {
                acc[j][0] += *v as f64;
                acc[j][1] += i as f64;
            }
        });
        for (j, s) in sums.iter().enumerate() {
            let want: f64 = (0..rows).map(|i| (i * cols + j) as f64).sum();
            assert_eq!(s[0], want);
            assert_eq!(s[1], (rows * (rows - 1) / 2) as f64);
        }
        for_rows(&mut data, cols, |i, row| row[0] = i as f32);
        assert!((0..rows).all(|i| data[i * cols] == i as f32));
        let mut other = vec![0.0f32; rows];
        for_row_pairs(&mut data, cols, &mut other, 1, |i, a, b| {
            b[0] = a[0] + i as f32
        });
        assert!((0..rows).all(|i| other[i] == 2.0 * i as f32));
    }

    #[test]
    fn column_sums_do_not_depend_on_the_number_of_threads() {
        let cols = 5;
        let data = values(40 * ROWS_PER_TASK * cols + 3 * cols, 4);
        let sums = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                column_sums::<1>(&data, cols, |_, row, acc| {
                    for (a, v) in acc.iter_mut().zip(row) {
                        a[0] += *v as f64 * 1e-3;
                    }
                })
            })
        };
        let one = sums(1);
        for threads in [2, 3, 7] {
            assert_eq!(sums(threads), one, "{threads} threads");
        }
    }
}
