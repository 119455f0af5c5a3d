//! The center bank: per class, the mean adapted feature of every patch position over the
//! class's good training images, taken under the freshly initialised adaptor (method,
//! section 8); the nearest-center search the residuals and the noise scale need; and the
//! class choice inference makes (the flattened cosine argmax).

use candle_core::{Device, Result, Tensor};

/// Running sums over adapted features, for the centers and the features' spread.
pub(super) struct CenterSums {
    patches: usize,
    dim: usize,
    sums: Vec<f64>,
    counts: Vec<usize>,
    dim_sum: Vec<f64>,
    dim_sq: Vec<f64>,
    rows: usize,
}

impl CenterSums {
    pub fn new(classes: usize, patches: usize, dim: usize) -> CenterSums {
        CenterSums {
            patches,
            dim,
            sums: vec![0.0; classes * patches * dim],
            counts: vec![0; classes],
            dim_sum: vec![0.0; dim],
            dim_sq: vec![0.0; dim],
            rows: 0,
        }
    }

    /// Adds one image of `class`: its adapted features, [patches * dim].
    pub fn add(&mut self, class: usize, features: &[f32]) {
        let n = self.patches * self.dim;
        self.counts[class] += 1;
        for (s, v) in self.sums[class * n..(class + 1) * n]
            .iter_mut()
            .zip(features)
        {
            *s += *v as f64;
        }
        for (j, v) in features.iter().enumerate() {
            self.dim_sum[j % self.dim] += *v as f64;
            self.dim_sq[j % self.dim] += (*v as f64).powi(2);
        }
        self.rows += self.patches;
    }

    /// The centers, [classes, patches, dim] flattened. Every class needs an image.
    pub fn centers(&self) -> Vec<f32> {
        let n = self.patches * self.dim;
        self.sums
            .iter()
            .enumerate()
            .map(|(i, s)| (s / self.counts[i / n].max(1) as f64) as f32)
            .collect()
    }

    /// The mean over dimensions of each dimension's standard deviation over all patches:
    /// the features' spread, which a relative noise level is a fraction of.
    pub fn mean_std(&self) -> f64 {
        let rows = self.rows.max(1) as f64;
        (0..self.dim)
            .map(|j| {
                (self.dim_sq[j] / rows - (self.dim_sum[j] / rows).powi(2))
                    .max(0.0)
                    .sqrt()
            })
            .sum::<f64>()
            / self.dim as f64
    }
}

/// Per-class center banks and the search over them.
pub(super) struct CenterBank {
    /// [C*P, D]
    pub flat: Tensor,
    /// Row-normalised copy, [C*P, D]
    normed: Tensor,
    /// 1/|center_c| over the flattened bank, per class.
    inv_norm: Vec<f32>,
    patches: usize,
    /// `flat` in host memory, for the CPU step.
    host: Vec<f32>,
    dim: usize,
}

impl CenterBank {
    pub fn new(
        data: Vec<f32>,
        classes: usize,
        patches: usize,
        dim: usize,
        dev: &Device,
    ) -> Result<CenterBank> {
        let inv_norm = data
            .chunks(patches * dim)
            .map(|c| (1.0 / c.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()) as f32)
            .collect();
        let flat = Tensor::from_slice(&data, (classes * patches, dim), dev)?;
        let norms = flat.sqr()?.sum_keepdim(1)?.sqrt()?.affine(1.0, 1e-12)?;
        let normed = flat.broadcast_div(&norms)?;
        Ok(CenterBank {
            flat,
            normed,
            inv_norm,
            patches,
            host: data,
            dim,
        })
    }

    /// Rows of the bank nearest (cosine) to each patch of each image of `f` [B*P, D],
    /// searching class `classes[b]` for image b. Returns the global row indices.
    pub fn nearest_rows(&self, f: &Tensor, classes: &[usize]) -> Result<Tensor> {
        let idx = self.nearest(f, classes)?;
        Tensor::from_vec(idx, classes.len() * self.patches, f.device())
    }

    /// [`Self::nearest_rows`] as row numbers.
    pub fn nearest(&self, f: &Tensor, classes: &[usize]) -> Result<Vec<u32>> {
        let p = self.patches;
        let mut idx = Vec::with_capacity(classes.len() * p);
        for (b, &c) in classes.iter().enumerate() {
            let fb = f.narrow(0, b * p, p)?;
            let bank = self.normed.narrow(0, c * p, p)?;
            let q = fb
                .matmul(&bank.t()?)?
                .argmax_keepdim(1)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            idx.extend(q.into_iter().map(|q| (c * p) as u32 + q));
        }
        Ok(idx)
    }

    /// Row `row` of the bank ([D]).
    pub fn center(&self, row: usize) -> &[f32] {
        &self.host[row * self.dim..(row + 1) * self.dim]
    }

    /// The class each image would be assigned at inference (flattened cosine argmax).
    pub fn choose_classes(&self, f: &Tensor, images: usize) -> Result<Vec<usize>> {
        let p = self.patches;
        let d = f.dim(1)?;
        let c = self.inv_norm.len();
        let ff = f.reshape((images, p * d))?;
        let cf = self.flat.reshape((c, p * d))?;
        let dots = ff.matmul(&cf.t()?)?.to_vec2::<f32>()?;
        Ok(dots
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(k, v)| (k, v * self.inv_norm[k]))
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |best, x| if x.1 > best.1 { x } else { best },
                    )
                    .0
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Class 0 points along +x / +y, class 1 along -x / -y (2 patches, 2 dims).
    fn bank() -> CenterBank {
        let data = vec![1.0, 0.0, 0.0, 2.0, -3.0, 0.0, 0.0, -1.0];
        CenterBank::new(data, 2, 2, 2, &Device::Cpu).unwrap()
    }

    fn rows(t: &[f32], n: usize) -> Tensor {
        Tensor::from_vec(t.to_vec(), (n, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn the_nearest_center_is_searched_in_the_given_class_by_cosine() {
        let b = bank();
        // Image 0 (class 0): patch 0 (0.6, 0.4) is nearer +x by cosine, though its dot
        // product with the twice-as-long +y center is larger; patch 1 is nearer +y.
        // Image 1 (class 1): patch 0 nearer -y, patch 1 nearer -x.
        let f = rows(&[0.6, 0.4, 0.1, 0.9, 0.1, -0.9, -0.5, 0.1], 4);
        let r = b
            .nearest_rows(&f, &[0, 1])
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(r, vec![0, 1, 3, 2]);
        // The same features searched in the other classes land in those classes' rows.
        let r = b
            .nearest_rows(&f, &[1, 0])
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert!(r[..2].iter().all(|i| *i >= 2) && r[2..].iter().all(|i| *i < 2));
    }

    #[test]
    fn an_image_gets_the_class_of_the_most_similar_flattened_center() {
        let b = bank();
        // Flattened cosine: image 0 ~ class 0's (1,0,0,2), image 1 ~ class 1's (-3,0,0,-1).
        let f = rows(&[0.5, 0.0, 0.0, 1.0, -1.0, 0.1, 0.0, -0.2], 4);
        assert_eq!(b.choose_classes(&f, 2).unwrap(), vec![0, 1]);
    }

    #[test]
    fn centers_are_the_per_class_per_patch_means_and_the_spread_is_per_dimension() {
        let mut s = CenterSums::new(2, 2, 2);
        s.add(0, &[1.0, 2.0, 3.0, 4.0]);
        s.add(0, &[3.0, 2.0, 5.0, 0.0]);
        s.add(1, &[-1.0, 0.0, 0.0, 1.0]);
        assert_eq!(s.centers(), vec![2.0, 2.0, 4.0, 2.0, -1.0, 0.0, 0.0, 1.0]);
        // Dimension 0 over all 6 patches: 1, 3, 3, 5, -1, 0 (mean 11/6);
        // dimension 1: 2, 4, 2, 0, 0, 1 (mean 9/6). Population standard deviations.
        let sd = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        let expected =
            (sd(&[1.0, 3.0, 3.0, 5.0, -1.0, 0.0]) + sd(&[2.0, 4.0, 2.0, 0.0, 0.0, 1.0])) / 2.0;
        assert!((s.mean_std() - expected).abs() < 1e-12);
    }
}
