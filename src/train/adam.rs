//! The method's optimisers, written out: AdamW (decoupled weight decay) for the adaptor
//! and Adam with L2 weight decay for the scorer, as the reference trains them.

use candle_core::{Result, Tensor, Var};

/// Adam moments of one variable.
pub(super) struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

/// Adam (L2 weight decay added to the gradient) or AdamW (decoupled decay).
pub(super) struct Adam {
    lr: f64,
    weight_decay: f64,
    decoupled: bool,
    /// Steps taken (bias correction); saved in the checkpoint.
    pub step: i32,
    /// One per variable, in the order the variables were given.
    pub moments: Vec<Moments>,
}

impl Adam {
    pub fn new(vars: &[&Var], lr: f64, weight_decay: f64, decoupled: bool) -> Result<Adam> {
        let moments = vars
            .iter()
            .map(|v| {
                Ok(Moments {
                    m: v.as_tensor().zeros_like()?,
                    v: v.as_tensor().zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Adam {
            lr,
            weight_decay,
            decoupled,
            step: 0,
            moments,
        })
    }

    /// One step on `vars` (the same variables, in the same order, as at creation) with
    /// the gradients autograd found for them.
    pub fn apply(&mut self, vars: &[&Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
        let grads: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        self.apply_grads(vars, &grads)
    }

    /// One step on `vars` with their gradients, in the same order; a variable without
    /// one keeps its value and moments.
    pub fn apply_grads(&mut self, vars: &[&Var], grads: &[Option<Tensor>]) -> Result<()> {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        const EPS: f64 = 1e-8;
        self.step += 1;
        let (c1, c2) = (1.0 - B1.powi(self.step), 1.0 - B2.powi(self.step));
        for ((var, mo), g) in vars.iter().zip(self.moments.iter_mut()).zip(grads) {
            let Some(g) = g else {
                continue;
            };
            let theta = var.as_tensor();
            let g = if !self.decoupled && self.weight_decay > 0.0 {
                g.add(&theta.affine(self.weight_decay, 0.0)?)?
            } else {
                g.clone()
            };
            mo.m = mo.m.affine(B1, 0.0)?.add(&g.affine(1.0 - B1, 0.0)?)?;
            mo.v =
                mo.v.affine(B2, 0.0)?
                    .add(&g.sqr()?.affine(1.0 - B2, 0.0)?)?;
            let update =
                mo.m.affine(1.0 / c1, 0.0)?
                    .div(&mo.v.affine(1.0 / c2, 0.0)?.sqrt()?.affine(1.0, EPS)?)?;
            let mut next = theta.sub(&update.affine(self.lr, 0.0)?)?;
            if self.decoupled && self.weight_decay > 0.0 {
                next = next.sub(&theta.affine(self.lr * self.weight_decay, 0.0)?)?;
            }
            var.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_tensor(&Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()).unwrap()
    }

    /// The loss sum(g * theta) has gradient g whatever theta is.
    fn step(opt: &mut Adam, theta: &Var, g: &[f32]) {
        let g = Tensor::from_vec(g.to_vec(), g.len(), &Device::Cpu).unwrap();
        let loss = theta.as_tensor().mul(&g).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.apply(&[theta], &grads).unwrap();
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn adam_with_l2_matches_a_hand_computed_update() {
        // theta 1.0, gradient 0.5, lr 0.1, L2 0.1: g' = 0.5 + 0.1 * 1.0 = 0.6.
        // Step 1: m = 0.06, v = 0.00036; m^ = 0.6, v^ = 0.36; update 0.6 / (0.6 + 1e-8).
        let theta = var(&[1.0, -2.0]);
        let mut opt = Adam::new(&[&theta], 0.1, 0.1, false).unwrap();
        step(&mut opt, &theta, &[0.5, 0.0]);
        let t = values(&theta);
        let expected0 = 1.0 - 0.1 * 0.6 / (0.6 + 1e-8);
        // Second element: g' = 0 + 0.1 * -2 = -0.2, so it moves up by lr.
        let expected1 = -2.0 + 0.1 * 0.2 / (0.2 + 1e-8);
        assert!((t[0] as f64 - expected0).abs() < 2e-6, "{t:?}");
        assert!((t[1] as f64 - expected1).abs() < 2e-6, "{t:?}");
        assert_eq!(opt.step, 1);
        // Step 2 at theta 0.9 with gradient 0.5: g' = 0.59;
        // m = 0.9 * 0.06 + 0.1 * 0.59 = 0.113, v = 0.999 * 0.00036 + 0.001 * 0.3481;
        // m^ = m / 0.19, v^ = v / (1 - 0.999^2).
        step(&mut opt, &theta, &[0.5, 0.0]);
        let theta1 = expected0;
        let g = 0.5 + 0.1 * theta1;
        let m = 0.9 * 0.06 + 0.1 * g;
        let v = 0.999 * 0.00036 + 0.001 * g * g;
        let (mh, vh) = (m / (1.0 - 0.81), v / (1.0 - 0.999f64.powi(2)));
        let expected = theta1 - 0.1 * mh / (vh.sqrt() + 1e-8);
        assert!((values(&theta)[0] as f64 - expected).abs() < 2e-6);
    }

    #[test]
    fn adamw_decays_the_weights_apart_from_the_gradient() {
        // AdamW: theta - lr * (m^ / (sqrt(v^) + eps)) - lr * wd * theta. With gradient 0
        // the Adam part is 0 and only the decay acts: 2.0 - 0.1 * 0.5 * 2.0 = 1.9.
        let theta = var(&[2.0]);
        let mut opt = Adam::new(&[&theta], 0.1, 0.5, true).unwrap();
        step(&mut opt, &theta, &[0.0]);
        assert!((values(&theta)[0] - 1.9).abs() < 1e-6);
        // With a gradient, the step is the plain Adam step (lr, sign of g) plus the decay.
        step(&mut opt, &theta, &[1.0]);
        // m = 0.1, v = 0.001 * 1 (previous moments 0); m^ = 0.1 / 0.19, v^ = 0.001 / 0.001999.
        let (mh, vh) = (0.1 / 0.19, 0.001 / (1.0 - 0.999f64.powi(2)));
        let expected = 1.9 - 0.1 * mh / (vh.sqrt() + 1e-8) - 0.1 * 0.5 * 1.9;
        assert!((values(&theta)[0] as f64 - expected).abs() < 1e-5);
    }
}
