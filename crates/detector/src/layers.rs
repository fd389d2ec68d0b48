//! Layers of the heads: a convolution with an optional norm, a fully connected layer and a transposed
//! convolution, each reporting its multiply-accumulates to `backbone::flops` so `trainer info` covers the heads.

use backbone::flops;
use backbone::layers::{Conv2d, ConvInit, ConvOpts};
use backbone::norm::{Norm, NormSpec};
use tch::{nn, Tensor};

use crate::DetectorError;

/// A convolution (variables `weight`, `bias` when there is no norm) followed by an optional norm (`norm.weight`,
/// `norm.bias`, and for BatchNorm `norm.running_mean`, `norm.running_var`) and ReLU, named as detectron2 names its
/// `Conv2d` with `norm`.
#[derive(Debug)]
pub struct ConvUnit {
    conv: Conv2d,
    norm: Option<Norm>,
    relu: bool,
}

impl ConvUnit {
    /// A `kernel x kernel` convolution from `cin` to `cout` channels under `path`, then the norm `norm` describes
    /// (see [`crate::config::HeadNorm::spec`]); the bias exists only without a norm and starts at zero.
    pub fn new(
        path: &nn::Path,
        (cin, cout, kernel): (i64, i64, i64),
        init: ConvInit,
        norm: Option<&NormSpec>,
        relu: bool,
    ) -> Result<ConvUnit, DetectorError> {
        let opts = ConvOpts { bias: norm.is_none(), init, ..Default::default() };
        let conv = Conv2d::new(path, cin, cout, kernel, opts);
        let norm = norm.map(|spec| Norm::new(&path.sub("norm"), cout, spec)).transpose()?;
        Ok(ConvUnit { conv, norm, relu })
    }

    /// conv → (norm; BatchNorm uses batch statistics when `train`) → (ReLU).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = self.conv.forward(x);
        if let Some(norm) = &self.norm {
            y = norm.forward_t(&y, train);
        }
        if self.relu {
            y = y.relu();
        }
        y
    }
}

/// How a fully connected layer's weight is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinearInit {
    /// detectron2's `c2_xavier_fill`: uniform in ±sqrt(3 / fan_in).
    XavierFanIn,
    /// Normal with the given standard deviation.
    Normal(f64),
}

/// A fully connected layer `y = x W^T + b` with a zero-initialised bias.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Creates `weight` `[out, in]` and `bias` `[out]` under `path`.
    pub fn new(path: &nn::Path, cin: i64, cout: i64, init: LinearInit) -> Linear {
        let init = match init {
            LinearInit::XavierFanIn => {
                let bound = (3.0 / cin as f64).sqrt();
                nn::Init::Uniform { lo: -bound, up: bound }
            }
            LinearInit::Normal(stdev) => nn::Init::Randn { mean: 0.0, stdev },
        };
        Linear { weight: path.var("weight", &[cout, cin], init), bias: path.zeros("bias", &[cout]) }
    }

    /// Applies the layer to `[N, in]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if flops::counting() {
            let w = self.weight.size();
            flops::record_macs((x.size()[0] * w[0] * w[1]) as u64);
        }
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// A 2x2 stride-2 transposed convolution with bias (the mask head's upsampling), MSRA fan-out init.
#[derive(Debug)]
pub struct Deconv2x2 {
    weight: Tensor,
    bias: Tensor,
}

impl Deconv2x2 {
    /// Creates `weight` `[in, out, 2, 2]` and `bias` `[out]` under `path`.
    pub fn new(path: &nn::Path, cin: i64, cout: i64) -> Deconv2x2 {
        // PyTorch's fan_out of a transposed convolution weight [in, out, k, k] is in * k * k.
        let stdev = (2.0 / (cin * 4) as f64).sqrt();
        Deconv2x2 {
            weight: path.var("weight", &[cin, cout, 2, 2], nn::Init::Randn { mean: 0.0, stdev }),
            bias: path.zeros("bias", &[cout]),
        }
    }

    /// Doubles the spatial size of `[N, in, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if flops::counting() {
            let s = x.size();
            let w = self.weight.size();
            flops::record_macs((s[0] * s[2] * s[3] * w[0] * w[1] * 4) as u64);
        }
        x.conv_transpose2d(&self.weight, Some(&self.bias), [2, 2], [0, 0], [0, 0], 1, [1, 1])
    }
}
